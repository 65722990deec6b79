"""End-to-end: the prompt cache reuses prefixes from RAM, then from disk after a restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful agent. " + " ".join(
    f"Rule {i}: the quick brown fox obeys." for i in range(60)
)


def chat(url: str, user: str, stream: bool = False, key: str | None = None) -> tuple[dict, str]:
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    if key:
        body["prompt_cache_key"] = key
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    if not stream:
        return r.json()["usage"], r.headers["x-mlxtg-cache"]
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return chunks[-1]["usage"], r.headers["x-mlxtg-cache"]


def test_prefix_reuse_from_ram_then_disk_after_restart(tmp_path: Path, tiny_llama: Path):
    home = tmp_path / "home"
    args = ["--model", str(tiny_llama)]
    srv = start_server(home, args, api_key=None)
    try:
        cold, header = chat(srv.url, "first question")
        assert cold["prompt_tokens"] > 300
        assert cold["prompt_tokens_details"]["cached_tokens"] == 0
        assert header.startswith("none")
        warm, header = chat(srv.url, "second question", stream=True, key="agent-1")
        assert warm["prompt_tokens_details"]["cached_tokens"] >= 300
        assert header.startswith("ram")
        computed_before = srv.status()["models"][0]["worker"]["stats"]["prompt_tokens_computed"]
        stats = httpx.get(f"{srv.url}/admin/cache", timeout=10).json()
        assert {"hits", "misses", "bytes"} <= stats["resident"]["tiny-llama"]["ram"].keys()
        assert isinstance(stats["on_disk"], list)  # heartbeat-fresh counters, plus the files
    finally:
        assert srv.stop() == 0
    assert computed_before < 2 * cold["prompt_tokens"]

    env = {**srv.env()}
    ls = subprocess.run(
        [sys.executable, "-m", "mlxtg", "cache", "ls", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    entries = json.loads(ls.stdout)
    assert entries and entries[0]["model"] == "tiny-llama" and entries[0]["tokens"] >= 256

    again = start_server(home, args, api_key=None)
    try:
        hit, header = chat(again.url, "third question")
        assert header.startswith("disk")
        assert hit["prompt_tokens_details"]["cached_tokens"] >= 256
        out = subprocess.run(
            [sys.executable, "-m", "mlxtg", "cache", "clear", "tiny-llama"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert "tiny-llama" in out.stdout
        miss, header = chat(again.url, "fourth question " * 3)
        assert not header.startswith("disk")
        # Clearing right behind a request races the worker's background writes: it must
        # never cost the worker its life.
        for _ in range(3):
            chat(again.url, "fifth question")
            httpx.post(f"{again.url}/admin/cache/clear", json={"model": None}, timeout=30).raise_for_status()
        chat(again.url, "sixth question")
        assert again.status()["counters"]["worker_restarts"] == 0
    finally:
        assert again.stop() == 0
