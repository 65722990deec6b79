"""Gateway process entry: `python -m mlxtg.gateway` (started by `mlxtg up`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import uvicorn

from .app import create_app
from .settings import GatewaySettings


def _exit_with_parent() -> None:
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def main() -> int:
    settings = GatewaySettings.from_env()
    logging.basicConfig(
        level=os.environ.get("MLXTG_LOG_LEVEL", "INFO"),
        format="%(asctime)s gateway %(levelname)s %(message)s",
    )
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
