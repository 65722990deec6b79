"""What every API surface shares: collecting a run into one body, the client-disconnect
watch, keep-alives while nothing arrives, and the prompt-cache response header."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..protocol import Delta
from . import format as fmt
from .errors import APIError
from .run import Run

ACCEPT_WAIT_S = 2.0  # how long a stream waits for validation before sending headers
KEEPALIVE_S = 5.0


async def collect(
    request: Request,
    run: Run,
    build: Callable[[list[fmt.ChoiceAccumulator]], dict[str, Any]],
    metrics: Any,
    tokens: Callable[[dict[str, Any]], int] = lambda body: int(body["usage"]["completion_tokens"]),
) -> JSONResponse:
    async def gather() -> dict[str, Any]:
        async with run:
            await run.accept()
            accs: dict[int, fmt.ChoiceAccumulator] = {}
            async for index, delta in run.events():
                accs.setdefault(index, fmt.ChoiceAccumulator(index)).add(delta)
            return build([accs[i] for i in sorted(accs)])

    task = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(disconnected(request))
    done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:  # the client left: cancelling the task aborts the request
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, APIError):
            await task
        metrics.request_done("aborted")
        return JSONResponse({}, status_code=499)
    gone.cancel()
    try:
        body = task.result()
    except APIError as exc:
        metrics.request_done(str(exc.status))
        raise
    metrics.observe_run(run, tokens(body))
    metrics.request_done("200")
    return JSONResponse(body, headers=cache_headers(run))


async def open_stream(run: Run) -> tuple[bool, dict[str, str]]:
    """Start a streamed run: wait briefly for validation, so a bad request is still a plain
    HTTP error; returns (accepted yet, response headers). The caller closes the run."""
    await run.__aenter__()
    try:
        accepted = await run.accept(timeout=ACCEPT_WAIT_S)
    except BaseException:
        await run.__aexit__(None, None, None)
        raise
    headers = cache_headers(run) if accepted else {}
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"
    return accepted, headers


async def disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def cache_headers(run: Run) -> dict[str, str]:
    facts = run.facts[0]
    value = f"{facts.cache_source}; cached_tokens={run.cached_tokens}"
    if facts.cache_miss_reason:
        value += f"; miss={facts.cache_miss_reason}"
    return {"x-mlxtg-cache": value}


async def with_keepalive(
    events: AsyncIterator[tuple[int, Delta]],
) -> AsyncIterator[tuple[int, Delta | None]]:
    """Yield (index, None) every KEEPALIVE_S while nothing arrives (long prefill)."""
    it = events.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=KEEPALIVE_S)
            if not done:
                yield -1, None
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        nxt.cancel()
