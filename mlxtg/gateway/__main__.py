"""Gateway process entry: `python -m mlxtg.gateway` (started by `mlxtg up`).

Exit codes: 0 after a clean stop or a drain that cut nothing, 3 when a drain had to cut
requests (the supervisor turns that into a non-zero exit of `mlxtg up`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from ..lifeline import exit_with_parent
from .app import create_app
from .settings import GatewaySettings

EXIT_CUT = 3


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains (new requests get 503 while
    in-flight ones finish) instead of closing the listening socket at once. A second
    signal stops right away."""

    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._app.state.drain.on_finished = self._exit
        await super().serve(sockets)

    def _exit(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        drain = self._app.state.drain
        client = getattr(self._app.state, "client", None)
        if drain.active or self._loop is None or client is None:
            super().handle_exit(sig, frame)
            return
        # A signal handler runs between bytecodes of the loop's thread: schedule, don't run.
        self._loop.call_soon_threadsafe(drain.begin, client)


def main() -> int:
    settings = GatewaySettings.from_env()
    logging.basicConfig(
        level=os.environ.get("MLXTG_LOG_LEVEL", "INFO"),
        format="%(asctime)s gateway %(levelname)s %(message)s",
    )
    exit_with_parent()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=3,
        # Well above clients' pool expiry (httpx: 5 s): at uvicorn's default of 5 s a
        # client reusing a connection idle for ~4.99 s races the close and gets a reset.
        timeout_keep_alive=65,
    )
    sockets = None
    if settings.listen_fd is not None:  # one of several gateways sharing `mlxtg up`'s socket
        sockets = [socket.socket(fileno=settings.listen_fd)]
    DrainingServer(config, app).run(sockets=sockets)
    return EXIT_CUT if app.state.drain.cut else 0


if __name__ == "__main__":
    sys.exit(main())
