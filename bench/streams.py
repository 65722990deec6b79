"""The streaming chat client of the serving benchmarks and what its chunk timestamps say.

`fire` sends c streaming `/v1/chat/completions` requests at once; `summarize` turns the
client-side timestamps into aggregate tok/s, TTFT percentiles and stream smoothness.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

DONE = object()  # the `data: [DONE]` sentinel


def sse_json(line: str) -> Any:
    """The JSON of one SSE `data:` line; None for any other line, DONE for `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == "[DONE]" else json.loads(data)


@dataclass
class StreamResult:
    ok: bool = False
    error: str | None = None
    t_send: float = 0.0
    t_first_chunk: float | None = None  # first SSE data event of any kind
    t_first: float | None = None  # first chunk with non-empty content
    t_last: float | None = None  # last chunk with content
    content_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # from usage
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text_len: int = 0
    retries: int = 0  # connection failures before any response byte, retried at once
    exc: Exception | None = None


async def stream_one(client: Any, url: str, body: dict[str, Any], timeout: float) -> StreamResult:
    """One streamed request. A connection dropped before any response byte is retried (up to
    3 times, as the OpenAI SDK would); TTFT still counts from the first attempt."""
    import httpx

    t_send = time.perf_counter()
    for attempt in range(4):
        res = await _stream_once(client, url, body, timeout)
        res.t_send, res.retries = t_send, attempt
        if res.ok or not isinstance(res.exc, httpx.TransportError) or res.t_first_chunk is not None:
            break
    return res


async def _stream_once(client: Any, url: str, body: dict[str, Any], timeout: float) -> StreamResult:
    res = StreamResult()
    res.t_send = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    res.error = f"HTTP {resp.status_code}: {text[:500]}"
                    return res
                async for line in resp.aiter_lines():
                    obj = sse_json(line)
                    now = time.perf_counter()
                    if obj is None:
                        continue
                    if obj is DONE:
                        break
                    if "error" in obj:
                        res.error = f"error event: {json.dumps(obj)[:500]}"
                        return res
                    if res.t_first_chunk is None:
                        res.t_first_chunk = now
                    if obj.get("usage"):
                        res.completion_tokens = obj["usage"].get("completion_tokens")
                        res.prompt_tokens = obj["usage"].get("prompt_tokens")
                    for ch in obj.get("choices") or []:
                        content = (ch.get("delta") or {}).get("content")
                        if content:
                            res.content_times.append(now)
                            res.text_len += len(content)
                            if res.t_first is None:
                                res.t_first = now
                            res.t_last = now
                        if ch.get("finish_reason"):
                            res.finish_reason = ch["finish_reason"]
        res.ok = res.t_first is not None
        if not res.ok:
            res.error = "stream ended without content"
    except TimeoutError:
        res.error = f"timed out after {timeout:.0f}s"
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        res.error = f"{type(exc).__name__}: {exc}"
        res.exc = exc
    return res


async def fire(
    base: str, bodies: list[dict[str, Any]], timeout: float
) -> tuple[float, list[StreamResult]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_one(client, base + "/v1/chat/completions", b, timeout) for b in bodies)
        )
    return t0, list(results)


def request_body(model_field: str, msgs: list[dict[str, str]], max_tokens: int, eos: list[int]) -> dict[str, Any]:
    return {
        "model": model_field,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(i): -100 for i in eos},
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(t0: float, results: list[StreamResult], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    toks = [r.completion_tokens if r.completion_tokens is not None else len(r.content_times) for r in ok]
    wrong = [
        (i, t) for i, t in enumerate(toks) if t != max_tokens
    ]
    total = sum(toks)
    t_end = max((r.t_last for r in ok if r.t_last), default=t0)
    wall = max(t_end - t0, 1e-9)
    ttft = [(r.t_first - r.t_send) * 1e3 for r in ok if r.t_first]
    first_chunk = [(r.t_first_chunk - r.t_send) * 1e3 for r in ok if r.t_first_chunk]
    per_stream = []
    itl = []
    gaps: list[float] = []
    stream_gaps: list[float] = []  # each stream's median chunk gap
    for r, n in zip(ok, toks, strict=True):
        if r.t_first and r.t_last and n > 1 and r.t_last > r.t_first:
            per_stream.append((n - 1) / (r.t_last - r.t_first))
            itl.append((r.t_last - r.t_first) / (n - 1) * 1e3)
        g = [(b - a) * 1e3 for a, b in zip(r.content_times, r.content_times[1:], strict=False)]
        gaps += g
        if g:
            stream_gaps.append(statistics.median(g))
    raw = [
        [round((r.t_send - t0) * 1e3, 1),
         round((r.t_first - t0) * 1e3, 1) if r.t_first else None,
         round((r.t_last - t0) * 1e3, 1) if r.t_last else None,
         len(r.content_times)]
        for r in results
    ]
    return {
        "raw_send_first_last_chunks_ms": raw,
        "retries": sum(r.retries for r in results),
        "n": len(results),
        "ok": len(ok),
        "errors": errors[:5],
        "n_errors": len(errors),
        "total_tokens": total,
        "wrong_counts": wrong[:5],
        "n_wrong": len(wrong),
        "chunks_per_token": (sum(len(r.content_times) for r in ok) / total) if total else None,
        "prompt_tokens": [r.prompt_tokens for r in ok],
        "wall_s": wall,
        "agg_tps": total / wall,
        "per_stream_tps": statistics.mean(per_stream) if per_stream else float("nan"),
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p95": pct(ttft, 0.95),
        "first_chunk_p50": pct(first_chunk, 0.5),
        "itl_ms": statistics.median(itl) if itl else float("nan"),
        "gap_p50_ms": pct(gaps, 0.5),
        "gap_p95_ms": pct(gaps, 0.95),
        "gap_max_ms": max(gaps) if gaps else float("nan"),
        # Smoothness: a stream's median gap should be one engine step (the pooled median gap,
        # "steady-state step"), its p95 at most two steps; bursts show as a ~0 median.
        "step_ms": pct(gaps, 0.5),
        "stream_gap_p50_ms": pct(stream_gaps, 0.5),
        "stream_gap_max_ms": max(stream_gaps) if stream_gaps else float("nan"),
    }


# -- the agent benchmark's client: one request, its reply, usage and cache header ----------------
@dataclass
class Reply:
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft: float | None = None  # s, send -> first streamed chunk of a choice (the first token)
    ttft_content: float | None = None  # s, send -> first chunk with non-empty content / call
    first_chunk: float | None = None  # s, send -> first data event of any kind
    total: float | None = None
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not report it
    cache_header: str | None = None
    raw_usage: dict[str, Any] | None = None


def stream_chat(client: Any, url: str, body: dict[str, Any], timeout: float) -> Reply:
    rep = Reply()
    calls: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url, json=body, timeout=timeout) as resp:
            rep.status = resp.status_code
            rep.cache_header = resp.headers.get("x-mlxtg-cache")
            if resp.status_code != 200:
                rep.error = f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:800]}"
                return rep
            for line in resp.iter_lines():
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"timed out after {timeout:.0f}s")
                obj = sse_json(line)
                now = time.perf_counter() - t0
                if obj is None:
                    continue
                if obj is DONE:
                    break
                if "error" in obj:
                    rep.error = f"error event: {json.dumps(obj)[:800]}"
                    return rep
                if rep.first_chunk is None:
                    rep.first_chunk = now
                if obj.get("usage"):
                    u = obj["usage"]
                    rep.raw_usage = u
                    rep.prompt_tokens = u.get("prompt_tokens")
                    rep.completion_tokens = u.get("completion_tokens")
                    det = u.get("prompt_tokens_details") or {}
                    if "cached_tokens" in det:
                        rep.cached_tokens = det["cached_tokens"]
                for ch in obj.get("choices") or []:
                    if rep.ttft is None:
                        rep.ttft = now
                    delta = ch.get("delta") or {}
                    got = False
                    if delta.get("content"):
                        rep.content += delta["content"]
                        got = True
                    for tc in delta.get("tool_calls") or []:
                        got = True
                        slot = calls.setdefault(
                            int(tc.get("index", len(calls))),
                            {
                                "id": None,
                                "type": "function",
                                "function": {"name": "", "arguments": ""},
                            },
                        )
                        if tc.get("id"):
                            slot["id"] = tc["id"]
                        fn = tc.get("function") or {}
                        if fn.get("name"):
                            slot["function"]["name"] += fn["name"]
                        if fn.get("arguments"):
                            slot["function"]["arguments"] += fn["arguments"]
                    if got and rep.ttft_content is None:
                        rep.ttft_content = now
                    if ch.get("finish_reason"):
                        rep.finish_reason = ch["finish_reason"]
        rep.total = time.perf_counter() - t0
        rep.tool_calls = [calls[k] for k in sorted(calls)]
        for i, c in enumerate(rep.tool_calls):
            c["id"] = c["id"] or f"call_{i}"
        rep.ok = True
        if rep.ttft is None:  # no choice chunk at all: count the first event instead
            rep.ttft = rep.first_chunk if rep.first_chunk is not None else rep.total
        if rep.ttft_content is None:
            rep.ttft_content = rep.total
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        rep.error = f"{type(exc).__name__}: {exc}"
    return rep
