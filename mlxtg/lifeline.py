"""Children of the supervisor exit by themselves when it disappears (even on SIGKILL)."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(interval: float = 1.0) -> None:
    """Start a daemon thread that ends this process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
