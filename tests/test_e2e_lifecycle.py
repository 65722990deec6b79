"""End-to-end: start, crash recovery, clean shutdown, restart on the same home."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_worker_crash_fails_inflight_then_respawns_and_shutdown_is_clean(
    tmp_path: Path, tiny_llama: Path
):
    home = tmp_path / "home"
    srv = start_server(home, ["--model", str(tiny_llama)], api_key=None)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    try:
        assert (
            httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        )
        worker_pid = srv.status()["models"][0]["worker"]["pid"]
        children = _children(srv.proc.pid)
        assert len(children) >= 2  # gateway and worker

        # A streaming request in flight when the worker dies ends with an error event.
        with httpx.stream(
            "POST",
            f"{srv.url}/v1/chat/completions",
            json=body | {"max_tokens": 1500, "stream": True, "ignore_eos": True},
            timeout=60,
        ) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(worker_pid, signal.SIGKILL)
            rest = "\n".join(lines)
        assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]")

        # The next request respawns the worker.
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        status = srv.status()
        assert status["models"][0]["worker"]["pid"] != worker_pid
        assert status["counters"]["worker_restarts"] == 1
    finally:
        children = _children(srv.proc.pid)
        code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.log.read_text()
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not (home / "run" / "server.json").exists()
    assert not list((home / "run").glob("*.sock"))

    # A second `mlxtg up` on the same home starts.
    again = start_server(home, ["--model", str(tiny_llama)], api_key=None)
    try:
        assert (
            httpx.post(f"{again.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        )
    finally:
        assert again.stop() == 0


def test_second_up_on_a_running_home_refuses(tmp_path: Path, tiny_llama: Path):
    home = tmp_path / "home"
    srv = start_server(home, ["--model", str(tiny_llama)], api_key=None)
    try:
        dup = start_server(home, ["--model", str(tiny_llama)], api_key=None, wait_ready=False)
        assert dup.proc.wait(timeout=60) == 1
        assert "already running" in dup.log.read_text()
    finally:
        assert srv.stop() == 0


def test_crash_loop_makes_up_exit_non_zero_for_the_service_manager(tmp_path: Path, tiny_llama: Path):
    srv = start_server(tmp_path / "home", ["--model", str(tiny_llama)], api_key=None)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        for _ in range(3):
            pid = srv.status()["models"][0]["worker"]["pid"]
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while srv.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).status_code == 200:
                        break
                except httpx.HTTPError:
                    break
                time.sleep(0.2)
        assert srv.proc.wait(timeout=60) == 1
        assert "giving up" in srv.log.read_text()
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
