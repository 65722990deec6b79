"""End-to-end: a worker that stops answering (SIGSTOP) is detected, its streams end with an
error event, and it is killed and respawned without any request to trigger it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow


def test_a_stopped_worker_is_detected_killed_and_respawned(tmp_path: Path, tiny_llama: Path):
    home = tmp_path / "home"
    home.mkdir()
    config = home / "models.yaml"
    config.write_text(
        f"heartbeat_timeout: 3\nmodels:\n  - model_id_or_path: {tiny_llama}\n"
    )
    srv = start_server(home, ["--config", str(config)], api_key=None)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    pid = srv.status()["models"][0]["worker"]["pid"]
    try:
        with httpx.stream(
            "POST",
            f"{srv.url}/v1/chat/completions",
            json=body | {"max_tokens": 1500, "stream": True, "ignore_eos": True},
            timeout=60,
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            rest = "\n".join(lines)
            detected_s = time.monotonic() - stopped_at
        assert '"error"' in rest and "hung" in rest, rest[-500:]
        assert rest.rstrip().endswith("data: [DONE]")
        print(f"hung worker detected in {detected_s:.1f}s")
        assert detected_s < 30  # generous: the limit is 3 s, the poll and the kill add a little

        # Respawned by the supervisor itself: ready again with a new worker, and serving.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            worker = srv.status()["models"][0].get("worker") or {}
            if worker.get("pid") not in (None, pid) and worker.get("state") == "ready":
                break
            time.sleep(0.3)
        assert httpx.get(f"{srv.url}/ready", timeout=10).status_code == 200
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert srv.status()["counters"]["worker_hangs"] == 1
        assert "is hung: no heartbeat" in srv.log.read_text()
    finally:
        code = srv.stop(signal.SIGTERM)
        if code != 0:
            print(srv.log.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
