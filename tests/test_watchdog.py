"""The hung-worker verdict and the step age the worker's heartbeat reports."""

from __future__ import annotations

import threading
import time
from typing import Any

from mlxtg.supervisor.watchdog import hung_reason
from mlxtg.worker.main import EngineLoop


def test_silent_worker_is_hung_after_the_heartbeat_timeout():
    assert hung_reason(2.0, {}, heartbeat_timeout=5, stall_timeout=60) is None
    assert "no heartbeat" in (hung_reason(6.0, {}, heartbeat_timeout=5, stall_timeout=60) or "")


def test_a_step_that_runs_too_long_is_a_stall_even_while_heartbeats_arrive():
    fresh = {"step_age_s": 59.0}
    assert hung_reason(0.5, fresh, heartbeat_timeout=5, stall_timeout=60) is None
    # The heartbeat's age adds to the step age it reported.
    assert "engine step" in (hung_reason(1.5, fresh, heartbeat_timeout=5, stall_timeout=60) or "")
    # Between steps (idle, or steps completing) nothing is stalled, however long it idles.
    assert hung_reason(1.0, {"step_age_s": 0.0}, heartbeat_timeout=5, stall_timeout=1) is None


class _BlockingEngine:
    """An engine whose step blocks until released, like a forward pass that hangs."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {"running": 1}
        self.release = threading.Event()
        self.entered = threading.Event()
        self.idle = False

    def step(self, items: list[Any], flush: Any = None) -> list[Any]:
        self.entered.set()
        self.release.wait(10)
        return []


class _IO:
    def __init__(self) -> None:
        self.calls = 0

    def take(self, block: bool) -> list[Any]:
        from mlxtg.worker.io import Shutdown

        self.calls += 1
        return [] if self.calls == 1 else [Shutdown()]

    def send_all(self, msgs: list[Any]) -> None:
        pass


def test_the_heartbeat_reports_how_long_the_running_step_has_run():
    engine = _BlockingEngine()
    loop = EngineLoop(engine)
    loop.io = _IO()  # type: ignore[assignment]
    assert loop.stats()["step_age_s"] == 0.0
    thread = threading.Thread(target=loop.run)
    thread.start()
    assert engine.entered.wait(10)
    time.sleep(0.05)
    age = loop.stats()["step_age_s"]
    engine.release.set()
    thread.join(10)
    assert age > 0.0
    assert loop.stats()["step_age_s"] == 0.0
