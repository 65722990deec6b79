"""Load progress from the worker: the loading code reports, one thread sends.

Loading runs on the main thread, and downloads in huggingface_hub's threads, while the main
thread may sit in one long call (a download, an `mx.eval`); the ZeroMQ socket belongs to one
thread at a time. So `LoadReporter` only records (thread-safe), and its sender thread owns
the socket from `start()` to `stop()`: it sends every phase change at once, and the newest
count within a phase at most `max_per_s` times a second. After `stop()` the socket is the
main thread's again, for READY.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..protocol import LoadPhase, Progress

log = logging.getLogger("mlxtg.worker")


class ProgressSink(Protocol):
    """What the loading code reports to (`NO_PROGRESS` where nobody listens)."""

    def phase(self, phase: LoadPhase, total: int | None = None, unit: str = "") -> None: ...

    def update(self, done: int, total: int | None = None) -> None: ...


class _NoProgress:
    def phase(self, phase: LoadPhase, total: int | None = None, unit: str = "") -> None:
        pass

    def update(self, done: int, total: int | None = None) -> None:
        pass


NO_PROGRESS: ProgressSink = _NoProgress()


class LoadReporter:
    """Records load progress from any thread; a sender thread passes it to `send`."""

    def __init__(
        self,
        worker_id: str,
        send: Callable[[Progress], None],
        max_per_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.worker_id = worker_id
        self._send = send
        self._interval = 1.0 / max_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._changes: list[Progress] = []  # phase starts not sent yet, oldest first
        self._latest: Progress | None = None  # the newest count in the current phase, unsent
        self._current = Progress(worker_id=worker_id, phase=LoadPhase.STARTING)
        self._last_sent = float("-inf")
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="load-progress", daemon=True)

    # --- recording (any thread) ---------------------------------------------------------------

    def phase(self, phase: LoadPhase, total: int | None = None, unit: str = "") -> None:
        """A new phase starts (`total` in `unit`s where known): always sent, and at once."""
        msg = Progress(
            worker_id=self.worker_id,
            phase=phase,
            done=0 if total is not None else None,
            total=total,
            unit=unit,
        )
        with self._lock:
            self._current, self._latest = msg, None  # an older phase's count is moot now
            self._changes.append(msg)
        self._wake.set()

    def update(self, done: int, total: int | None = None) -> None:
        """How far the current phase has got (`total` when it became known only now)."""
        with self._lock:
            cur = self._current
            msg = Progress(
                worker_id=self.worker_id,
                phase=cur.phase,
                done=done,
                total=cur.total if total is None else total,
                unit=cur.unit,
            )
            self._current = self._latest = msg

    def due(self, now: float) -> list[Progress]:
        """The messages to send at `now` (and forget): phase changes, then the newest count
        if the last send was at least one interval ago."""
        with self._lock:
            out, self._changes = self._changes, []
            if self._latest is not None and now - self._last_sent >= self._interval:
                out.append(self._latest)
                self._latest = None
            if out:
                self._last_sent = now
            return out

    # --- sending (the sender thread) ----------------------------------------------------------

    def start(self) -> LoadReporter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Send what is pending and end the sender thread (the caller owns the socket again)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)  # a phase change wakes it early
            self._wake.clear()
            stopping = self._stopping
            for msg in self.due(float("inf") if stopping else self._clock()):
                try:
                    self._send(msg)
                except Exception:  # progress is a courtesy: never fail the load over it
                    log.exception("could not send load progress")
            if stopping:
                return
