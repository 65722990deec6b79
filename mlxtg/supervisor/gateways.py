"""The gateway processes of `mlxtg up`: one, or several sharing one listening socket.

With `gateways: N > 1` the parent binds the port once and every gateway inherits the socket
(the kernel hands each new connection to one of them), so clients still see one address. Each
gateway talks to the one supervisor over its own socket; what they must agree on lives
elsewhere already (stored Responses in SQLite, models and caches in the workers). Their
Prometheus metrics go to files in one folder, and any gateway's /metrics adds them all up.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from .process_group import ProcessGroup
from .processes import spawn_gateway, stop_process

EXIT_CUT = 3  # a gateway's drain had to cut requests (gateway/__main__.py)


class GatewayGroup(ProcessGroup):
    """Shaped like the one gateway's Popen where `mlxtg up` waits on it."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], listener: socket.socket | None):
        super().__init__(procs)
        self._listener = listener  # kept open for the gateways' lifetime
        self._draining = False

    @classmethod
    def start(cls, config: dict[str, Any], count: int, run_dir: Path) -> GatewayGroup:
        if count == 1:
            return cls([spawn_gateway(config)], None)
        listener = _listen(config["host"], config["port"])
        metrics = run_dir / "gateway-metrics"
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir(parents=True)
        shared = {**config, "listen_fd": listener.fileno()}
        env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
        procs = [
            spawn_gateway(shared, env=env, pass_fds=(listener.fileno(),)) for _ in range(count)
        ]
        return cls(procs, listener)

    def send_signal(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._draining = True
        super().send_signal(sig)

    def poll(self) -> int | None:
        """While serving: the code of the first gateway that exits (an error). While
        draining: None until every gateway has exited, then 3 if any cut requests."""
        codes = [p.poll() for p in self.procs]
        done = [c for c in codes if c is not None]
        if not done or (self._draining and len(done) < len(codes)):
            return None
        if self._draining:
            self.returncode = EXIT_CUT if EXIT_CUT in done else next((c for c in done if c), 0)
        else:
            self.returncode = done[0]
        return self.returncode

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p)
        if self._listener is not None:
            self._listener.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
