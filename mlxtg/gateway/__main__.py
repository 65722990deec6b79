"""Gateway process entry: `python -m mlxtg.gateway` (started by `mlxtg up`)."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from ..lifeline import exit_with_parent
from .app import create_app
from .settings import GatewaySettings


def main() -> int:
    settings = GatewaySettings.from_env()
    logging.basicConfig(
        level=os.environ.get("MLXTG_LOG_LEVEL", "INFO"),
        format="%(asctime)s gateway %(levelname)s %(message)s",
    )
    exit_with_parent()
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
