"""POST /v1/chat/completions and /v1/completions, streamed and not.

The route builds GENERATE messages, waits (briefly) for the worker to accept them so that
a bad request is a proper HTTP error, then either collects the deltas into one body or
streams them as SSE. A client that disconnects aborts its request at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..constraints import GuidedError, spec_from_request
from ..protocol import Delta, Generate, GuidedSpec
from . import format as fmt
from .deps import Client, Metrics, Settings
from .errors import APIError, BadRequest
from .guards import check_request_size
from .run import Run
from .schemas import ChatCompletionRequest, CompletionRequest
from .streaming import KEEPALIVE_S, collect, open_stream, with_keepalive

router = APIRouter(prefix="/v1")


def _guided(body: Any) -> GuidedSpec | None:
    fields = body.guided_body()
    if not fields:
        return None
    try:
        return spec_from_request(fields)
    except GuidedError as exc:
        raise BadRequest(str(exc), param=exc.param) from exc


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    client: Client,
    settings: Settings,
    metrics: Metrics,
) -> Any:
    limit_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    limit = body.max_completion_tokens or body.max_tokens
    await check_request_size(request, body.model, body.n, "n", limit, limit_field)
    try:
        messages = [m.for_template() for m in body.messages]
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from exc
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    gen = Generate(
        request_id=rid,
        model=body.model,
        params=body.params(),
        messages=messages,
        tools=body.tools if body.effective_tool_choice() not in (None, "none") else None,
        tool_choice=body.effective_tool_choice(),
        chat_template_kwargs=body.chat_template_kwargs,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        stream=body.stream,
        n=body.n,
        guided=_guided(body),
        cache_key=body.cache_key,
        reasoning=body.reasoning(),
    )
    run = Run(client, [gen], body.n)
    if body.stream:
        return await _stream(
            request,
            run,
            body.model,
            rid,
            body.include_usage,
            metrics,
            chat=True,
            include_reasoning=body.include_reasoning,
        )
    return await collect(
        request,
        run,
        lambda acc: _chat_body(rid, body.model, run, acc, body.include_reasoning),
        metrics,
    )


@router.post("/completions")
async def completions(
    body: CompletionRequest, request: Request, client: Client, settings: Settings, metrics: Metrics
) -> Any:
    if body.suffix:
        raise BadRequest("suffix is not supported", param="suffix")
    prompts = body.prompts()
    await check_request_size(
        request,
        body.model,
        len(prompts) * body.n,
        "n" if body.n > 1 else "prompt",
        body.max_tokens,
        "max_tokens",
    )
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    params = body.params()
    guided = _guided(body)
    gens = []
    for p, prompt in enumerate(prompts):
        gens.append(
            Generate(
                request_id=f"{rid}-{p}",
                model=body.model,
                params=params,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=prompt if isinstance(prompt, list) else None,
                n=body.n,
                guided=guided,
                cache_key=body.cache_key,
                echo=body.echo,
            )
        )
    run = Run(client, gens, body.n)
    echoes = _Echoes(run, gens, prompts) if body.echo else None
    if body.stream:
        return await _stream(
            request, run, body.model, rid, body.include_usage, metrics, chat=False, echoes=echoes
        )
    return await collect(
        request,
        run,
        lambda acc: _completion_body(rid, body.model, run, acc, echoes, body.n),
        metrics,
    )


def _chat_body(
    rid: str, model: str, run: Run, accs: list[fmt.ChoiceAccumulator], include_reasoning: bool
) -> dict[str, Any]:
    completion = sum(a.completion_tokens for a in accs)
    reasoning = sum(a.reasoning_tokens for a in accs)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": run.created,
        "model": model,
        "choices": [a.chat_choice(include_reasoning) for a in accs],
        "usage": fmt.usage(run.prompt_tokens, completion, run.cached_tokens, reasoning),
    }


class _Echoes:
    """The text `echo` puts before each prompt's completion: the prompt as sent, or for
    token ids their text as the worker decoded it (known once the prompt is accepted)."""

    def __init__(self, run: Run, gens: list[Generate], prompts: list[str | list[int]]):
        self._run = run
        self._gens = gens
        self._prompts = prompts

    def __getitem__(self, p: int) -> str:
        prompt = self._prompts[p]
        if isinstance(prompt, str):
            return prompt
        accepted = self._run.accepted(self._gens[p].request_id)
        return (accepted.prompt_text if accepted else None) or ""


def _completion_body(
    rid: str,
    model: str,
    run: Run,
    accs: list[fmt.ChoiceAccumulator],
    echoes: _Echoes | None,
    n: int,
) -> dict[str, Any]:
    completion = sum(a.completion_tokens for a in accs)
    return {
        "id": rid,
        "object": "text_completion",
        "created": run.created,
        "model": model,
        "choices": [a.completion_choice(echoes[a.index // n] if echoes else "") for a in accs],
        "usage": fmt.usage(run.prompt_tokens, completion, run.cached_tokens),
    }


# --- streamed -------------------------------------------------------------------------------


async def _stream(
    request: Request,
    run: Run,
    model: str,
    rid: str,
    include_usage: bool,
    metrics: Any,
    chat: bool,
    echoes: _Echoes | None = None,
    include_reasoning: bool = True,
) -> StreamingResponse:
    accepted, headers = await open_stream(run)

    async def body() -> AsyncIterator[bytes]:
        completion_tokens = 0
        reasoning_tokens = 0
        status = "aborted"  # until the last event is sent: a client that leaves aborts
        try:
            if not accepted:  # the model is loading: keep the connection alive meanwhile
                accept_task = asyncio.ensure_future(run.accept())
                while True:
                    done, _ = await asyncio.wait({accept_task}, timeout=KEEPALIVE_S)
                    if done:
                        accept_task.result()
                        break
                    yield fmt.SSE_KEEPALIVE
            started: set[int] = set()
            last_token_at: dict[int, float] = {}
            async for index, delta in with_keepalive(run.events()):
                if delta is None:
                    yield fmt.SSE_KEEPALIVE
                    continue
                if delta.token_ids:
                    completion_tokens += 1
                    now = time.monotonic()
                    if index in last_token_at:
                        metrics.inter_token(run.model, now - last_token_at[index])
                    last_token_at[index] = now
                reasoning_tokens += delta.reasoning_tokens  # set on final deltas only
                for chunk in _chunks(
                    rid,
                    model,
                    run.created,
                    index,
                    delta,
                    chat,
                    started,
                    echoes,
                    run,
                    include_reasoning,
                ):
                    yield fmt.sse(chunk)
            if include_usage:
                yield fmt.sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": run.created,
                        "model": model,
                        "choices": [],
                        "usage": fmt.usage(
                            run.prompt_tokens, completion_tokens, run.cached_tokens, reasoning_tokens
                        ),
                    }
                )
            yield fmt.SSE_DONE
            status = "200"
        except APIError as exc:
            status = str(exc.status)
            yield fmt.sse(exc.body())
            yield fmt.SSE_DONE
        finally:
            await run.__aexit__(None, None, None)  # aborts the request if it did not finish
            metrics.observe_run(run, completion_tokens)
            metrics.request_done(status)

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _chunks(
    rid: str,
    model: str,
    created: int,
    index: int,
    delta: Delta,
    chat: bool,
    started: set[int],
    echoes: _Echoes | None,
    run: Run,
    include_reasoning: bool = True,
) -> list[dict[str, Any]]:
    out = []
    if chat:
        if index not in started:
            started.add(index)
            out.append(
                fmt.chat_chunk(
                    rid,
                    created,
                    model,
                    index,
                    {"role": "assistant", "content": "", "refusal": None},
                )
            )
        if delta.reasoning and include_reasoning:  # a chunk of its own, before the content of the same step
            out.append(
                fmt.chat_chunk(rid, created, model, index, fmt.reasoning_from(delta.reasoning))
            )
        d = fmt.chat_delta(delta)
        lp = fmt.chat_logprobs(delta.logprobs) if delta.logprobs else None
        if d or lp or delta.finish_reason:
            out.append(fmt.chat_chunk(rid, created, model, index, d, delta.finish_reason, lp))
    else:
        text = delta.text
        echo = ""
        if index not in started:
            started.add(index)
            if echoes:
                echo = echoes[index // run.n]
                text = echo + text
        lp = None
        if delta.logprobs or delta.prompt_logprobs:
            lp = fmt.completion_logprobs(delta.logprobs or [], len(echo), delta.prompt_logprobs)
        if text or lp or delta.finish_reason:
            out.append(
                fmt.completion_chunk(rid, created, model, index, text, delta.finish_reason, lp)
            )
    return out
