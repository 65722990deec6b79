"""End-to-end (issue 14, item 3): one huge request does not starve the others. A short request
finishes while a giant one still runs, a multi-megabyte prompt is refused without being
tokenised, and a slow tokenisation never holds back a running stream's tokens.

Assertions are on order and content, never on times."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import Server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"


async def stream_chunks(
    http: httpx.AsyncClient, server: Server, body: dict, seen: list
) -> list[str]:
    """Stream a completion, appending a marker to `seen` per chunk; returns the finish
    reasons of its choices."""
    finished = []
    async with http.stream(
        "POST", f"{server.url}/v1/completions", json=body | {"stream": True}, headers=server.headers
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                seen.append("chunk")
                finished += [
                    c["finish_reason"]
                    for c in json.loads(line[6:])["choices"]
                    if c["finish_reason"]
                ]
    return finished


async def short_during_giant(
    server: Server, giant: dict, small: dict
) -> tuple[list[str], httpx.Response, list[str]]:
    """Start `giant` streaming; once it streams, send `small`. Returns the order in which
    they finished, the short request's response and the giant's finish reasons."""
    order: list[str] = []
    async with httpx.AsyncClient(timeout=300) as http:
        chunks: list[str] = []
        big = asyncio.ensure_future(stream_chunks(http, server, giant, chunks))
        while not chunks:  # the giant request is running
            assert not big.done(), big.result()
            await asyncio.sleep(0.01)

        async def short() -> httpx.Response:
            r = await http.post(f"{server.url}/v1/completions", json=small, headers=server.headers)
            order.append("small")
            return r

        async def giant_done() -> None:
            await big
            order.append("giant")

        r, _ = await asyncio.gather(short(), giant_done())
    return order, r, big.result()


SMALL = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}


async def test_a_short_request_finishes_while_a_giant_one_runs(server: Server):
    # The fixture's server runs 16 rows: 4 prompts x n=8 need two rounds of the batch.
    giant = {
        "model": MODEL,
        "prompt": [f"Chapter {i}:" for i in range(4)],
        "n": 8,
        "max_tokens": 400,
        "ignore_eos": True,
    }
    order, r, finished = await short_during_giant(server, giant, SMALL)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    # Before: the short request queued behind all 32 sequences and finished last.
    assert order == ["small", "giant"]
    assert finished == ["length"] * 32  # and the giant request ran to its end


async def test_one_request_with_more_choices_than_rows_leaves_rows_to_others(server: Server):
    # One prompt x n=36 on 16 rows: its choices start in slices as rows free, and a short
    # request takes a row when the first slice ends instead of waiting for all 36.
    giant = {"model": MODEL, "prompt": "Chapter 1:", "n": 36, "max_tokens": 150}
    order, r, finished = await short_during_giant(server, giant | {"ignore_eos": True}, SMALL)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    # Before: all 36 choices joined at once and the short request finished last.
    assert order == ["small", "giant"]
    assert finished == ["length"] * 36


async def test_a_multi_megabyte_prompt_is_refused_untokenised_while_a_stream_runs(server: Server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}
    huge = ("All work and no play makes Jack a dull boy. " * 120_000)[:5_000_000]
    seen: list[str] = []
    async with httpx.AsyncClient(timeout=300) as http:
        stream = asyncio.ensure_future(stream_chunks(http, server, body, seen))
        while not seen:
            await asyncio.sleep(0.01)
        seen.append("sent")
        r = await http.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": huge, "max_tokens": 8},
            headers=server.headers,
        )
        seen.append("refused")
        finished = await stream
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "at least 312500 in the prompt" in error["message"]  # counted, not tokenised
    assert finished == ["length"]
    assert "chunk" in seen[seen.index("sent") :]  # the stream went on


async def test_a_slow_tokenisation_does_not_hold_back_a_running_stream(server: Server):
    # /tokenize has no context limit (lm-eval cuts whole documents into windows): 3 MB take
    # seconds to tokenise, on the worker's preprocess thread, while the stream (about a
    # second) goes on.
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    text = ("All work and no play makes Jack a dull boy. " * 70_000)[:3_000_000]
    order: list[str] = []
    async with httpx.AsyncClient(timeout=300) as http:
        seen: list[str] = []
        stream = asyncio.ensure_future(stream_chunks(http, server, body, seen))
        while not seen:
            await asyncio.sleep(0.01)

        async def tokenize() -> httpx.Response:
            r = await http.post(
                f"{server.url}/tokenize",
                json={"model": MODEL, "prompt": text},
                headers=server.headers,
            )
            order.append("tokenized")
            return r

        async def streamed() -> None:
            await stream
            order.append("stream done")

        r, _ = await asyncio.gather(tokenize(), streamed())
    assert r.status_code == 200 and r.json()["count"] > 500_000
    # Before: the I/O thread tokenised, and the stream's tokens waited behind it.
    assert order == ["stream done", "tokenized"]
