"""End-to-end: the RAM prompt cache holds no more memory than it reports and its budget
allows (issue 14, item 4): after bursts of batched requests the worker's MLX active memory
above its idle baseline stays within the cache's reported bytes plus a small margin."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow

BUDGET_BYTES = 4 << 20


def _stats(srv) -> dict:
    return srv.status()["models"][0]["worker"]["stats"]


def _idle_stats(srv) -> dict:
    # The heartbeat's snapshot is at most ~1 s old: wait for one that shows an idle engine.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _stats(srv)
        if stats.get("running") == 0 and stats.get("queued") == 0:
            time.sleep(1.5)
            return _stats(srv)
        time.sleep(0.2)
    raise AssertionError("the worker did not go idle")


async def _burst(url: str, headers: dict, burst: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as c:
        calls = [
            c.post(
                "/v1/chat/completions",
                json={
                    "model": "mlxtg-demo",
                    "messages": [
                        {"role": "user", "content": f"Burst {burst}, question {i}: " + "tell me more " * 12}
                    ],
                    "max_tokens": 24,
                    "ignore_eos": True,
                },
            )
            for i in range(12)
        ]
        for r in await asyncio.gather(*calls):
            assert r.status_code == 200, r.text


def test_ram_cache_memory_stays_within_what_it_reports(tmp_path):
    srv = start_server(
        tmp_path / "home",
        ["--cache-ram-gb", str(BUDGET_BYTES / (1 << 30)), "--cache-disk-gb", "0"],
    )
    try:
        baseline = _idle_stats(srv)["mlx_active_bytes"]
        for burst in range(6):
            asyncio.run(_burst(srv.url, srv.headers, burst))
        stats = _idle_stats(srv)
        cached = stats["prefix_cache"]["bytes"]
        held = stats["mlx_active_bytes"] - baseline
        assert stats["prefix_cache"]["entries"] > 0
        assert cached <= BUDGET_BYTES
        # What the cache reports is what it holds (plus a little for small live buffers).
        assert held <= cached + (1 << 20), (held, cached)
    finally:
        assert srv.stop() == 0
