"""End-to-end: a SIGKILLed supervisor leaves server.json and its sockets behind; its children
follow it (lifeline), `mlxtg status` says so in one line, and the next `mlxtg up` on the same
home cleans up, starts and serves."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _sockets(home: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    from mlxtg import paths

    monkeypatch.setenv("MLXTG_HOME", str(home))
    return [Path(paths.ipc_endpoint(n).removeprefix("ipc://")) for n in ("gateway", "workers")]


def test_up_after_a_sigkilled_supervisor(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
):
    home = tmp_path / "home"
    srv = start_server(home, ["--model", str(tiny_llama)], api_key=None)
    assert httpx.post(f"{srv.url}/v1/chat/completions", json=BODY, timeout=60).is_success
    children = psutil.Process(srv.proc.pid).children(recursive=True)
    assert len(children) >= 2  # gateway and worker

    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=60)  # they exit with their parent
    assert not alive
    server_file = home / "run" / "server.json"
    sockets = _sockets(home, monkeypatch)
    assert server_file.exists() and all(s.exists() for s in sockets)  # what SIGKILL leaves
    with socket.socket() as s:
        s.bind(("127.0.0.1", srv.port))  # the gateway's port is free again

    env = {**os.environ, "MLXTG_HOME": str(home)}
    status = subprocess.run(
        [sys.executable, "-m", "mlxtg", "status"], env=env, capture_output=True, text=True
    )
    assert status.returncode == 1 and status.stdout == ""
    assert status.stderr.count("\n") == 1 and status.stderr.startswith("error: cannot reach")

    again = start_server(home, ["--model", str(tiny_llama)], api_key=None)
    try:
        r = httpx.post(f"{again.url}/v1/chat/completions", json=BODY, timeout=60)
        assert r.status_code == 200, r.text
        assert again.status()["models"][0]["state"] == "loaded"
        info = subprocess.run(
            [sys.executable, "-m", "mlxtg", "status", "--json"], env=env, capture_output=True
        )
        assert info.returncode == 0, info.stderr
    finally:
        assert again.stop() == 0, again.log.read_text()
    assert not server_file.exists() and not any(s.exists() for s in sockets)
