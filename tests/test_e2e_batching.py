"""End-to-end: continuous batching is exact, cancellation frees the worker, admission bounds."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import Server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"
PROBE = [{"role": "user", "content": "What is the weather in Oslo?"}]


async def greedy_tokens(aclient, messages, max_tokens=24) -> list[str]:
    r = await aclient.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True
    )
    return [e.token for e in r.choices[0].logprobs.content]


async def test_batch_invariance_alone_crowded_and_mid_decode(aclient):
    alone = await greedy_tokens(aclient, PROBE)

    others = [
        aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me about topic number {i}."}],
            max_tokens=40,
            temperature=0.7 if i % 2 else 0,
            seed=i,
        )
        for i in range(15)
    ]
    crowded = await asyncio.gather(greedy_tokens(aclient, PROBE), *others)
    assert crowded[0] == alone

    # Arriving while another request is half-way through its decode.
    long = asyncio.ensure_future(
        aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a long story."}],
            max_tokens=80,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    )
    await asyncio.sleep(0.3)
    mid = await greedy_tokens(aclient, PROBE)
    await long
    assert mid == alone


async def test_n_choices_share_prefill_and_seeded_sampling_is_batch_independent(aclient):
    kw = dict(model=MODEL, messages=PROBE, max_tokens=12, temperature=1.0, seed=99)
    alone = await aclient.chat.completions.create(**kw, n=3)
    crowd = await asyncio.gather(
        aclient.chat.completions.create(**kw, n=3),
        *(
            aclient.chat.completions.create(
                model=MODEL, messages=PROBE, max_tokens=12, temperature=1.0
            )
            for _ in range(5)
        ),
    )
    assert [c.message.content for c in crowd[0].choices] == [
        c.message.content for c in alone.choices
    ]
    assert alone.usage.prompt_tokens == crowd[0].usage.prompt_tokens
    assert len({c.index for c in alone.choices}) == 3


async def test_abandoned_requests_leave_the_worker_idle(server: Server, client):
    body = {
        "model": MODEL,
        "messages": PROBE,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }

    async def abandon(http: httpx.AsyncClient, stream: bool) -> None:
        try:
            async with asyncio.timeout(0.5):
                async with http.stream(
                    "POST",
                    f"{server.url}/v1/chat/completions",
                    json=body | {"stream": stream},
                    headers=server.headers,
                ) as r:
                    async for _ in r.aiter_bytes():
                        pass
        except TimeoutError:
            pass

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:
        await asyncio.gather(*(abandon(http, i % 2 == 0) for i in range(100)))
    deadline = time.monotonic() + 2.0 + 1.5  # 2 s target, plus one heartbeat for status to refresh
    idle = False
    while time.monotonic() < deadline:
        stats = server.status()["models"][0]["worker"]["stats"]
        if stats["running"] == 0 and stats["queued"] == 0 and server.status()["routes"] == 0:
            idle = True
            break
        await asyncio.sleep(0.2)
    assert idle, server.status()
    r = client.chat.completions.create(model=MODEL, messages=PROBE, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


async def test_full_queue_answers_429_with_retry_after(server: Server):
    # The fixture's server allows 16 running and 40 queued requests.
    body = {"model": MODEL, "messages": PROBE, "max_tokens": 200, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as http:
        tasks = [
            asyncio.ensure_future(
                http.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers)
            )
            for _ in range(90)
        ]
        done, pending = await asyncio.wait(tasks, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        first = [t.result() for t in done]
        limited = [r for r in first if r.status_code == 429]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    assert limited, [r.status_code for r in first]
    assert limited[0].headers["retry-after"]
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
