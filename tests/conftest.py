"""Fixtures: tiny models built on the fly, and real `mlxtg up` servers in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_model  # noqa: E402

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    home: Path
    port: int
    log: Path
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def env(self) -> dict[str, str]:
        return {**os.environ, "MLXTG_HOME": str(self.home)}

    def status(self) -> dict:
        r = httpx.get(f"{self.url}/admin/status", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(
    home: Path,
    args: list[str],
    api_key: str | None = API_KEY,
    wait_ready: bool = True,
    timeout: float = 180,
) -> Server:
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"server-{port}.log"
    cmd = [sys.executable, "-m", "mlxtg", "up", "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "MLXTG_HOME": str(home)}
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", home, port, log, api_key)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        server.stop(signal.SIGKILL)
        raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text()}")
    return server


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `mlxtg up` (no model given: the shipped demo model) for the e2e tests.
    MLXTG_TEST_MODEL=PATH runs the same tests against another model, served under the
    demo model's name."""
    home = tmp_path_factory.mktemp("home")
    args = ["--max-batch", "16", "--max-queued", "40"]
    other = os.environ.get("MLXTG_TEST_MODEL")
    if other:
        (home / "models.yaml").write_text(
            f"- model_id_or_path: {other}\n  model_name: mlxtg-demo\n"
        )
        args += ["--config", str(home / "models.yaml")]
    srv = start_server(home, args)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log.read_text()


@pytest.fixture()
def client(server: Server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture()
async def aclient(server: Server):
    from openai import AsyncOpenAI

    async with AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    ) as c:
        yield c
