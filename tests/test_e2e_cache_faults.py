"""End-to-end: a cache folder that cannot be used costs the disk tier, never the model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow


def test_an_unusable_cache_folder_serves_from_ram_and_says_why(tmp_path: Path, tiny_llama: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "kv-cache").write_text("a file where the cache folder should be")
    srv = start_server(home, ["--model", str(tiny_llama)], api_key=None)
    try:
        body = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hello " * 40}],
            "max_tokens": 4,
            "temperature": 0,
        }
        for _ in range(2):
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
        assert r.headers["x-mlxtg-cache"].startswith("ram")  # the RAM tier still works
        disk: dict = {}
        for _ in range(100):  # the worker's stats arrive with its next heartbeat
            disk = srv.status()["models"][0]["worker"]["stats"].get("disk_cache") or {}
            if disk:
                break
            time.sleep(0.3)
        assert "Not a directory" in disk["disabled"] and "kv-cache" in disk["disabled"]
        shown = subprocess.run(
            [sys.executable, "-m", "mlxtg", "status"],
            env=srv.env(),
            capture_output=True,
            text=True,
            check=True,
        )
        assert "disk DISABLED (Not a directory" in shown.stdout
        assert "KV disk cache disabled" in srv.log.read_text()
        assert srv.status()["counters"]["worker_restarts"] == 0
    finally:
        assert srv.stop() == 0
