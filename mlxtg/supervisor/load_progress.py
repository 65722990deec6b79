"""Where each loading worker has got, on the supervisor's clock.

A worker sends PROGRESS between CONFIG and READY (worker/progress.py); the supervisor keeps
only the latest per worker, plus how long each phase took, so `mlxtg status`, the dashboard
and `mlxtg up`'s terminal read one view (`LoadProgress.view`), and a finished load leaves a
record (`LoadProgress.record`) of its phases after its progress is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..protocol import LoadPhase, Progress


def percent(done: int | None, total: int | None) -> float | None:
    """`done` of `total` in percent (one decimal, at most 100), None when either is unknown."""
    if done is None or not total or total <= 0:
        return None
    return round(min(100.0, max(0.0, 100.0 * done / total)), 1)


@dataclass(slots=True)
class LoadProgress:
    """The latest progress of one loading worker. `started` and `phase_started` are
    monotonic; a worker is `starting` from its spawn (or its CONFIG, for a standby worker)
    until it reports a phase."""

    started: float = field(default_factory=time.monotonic)
    phase: LoadPhase = LoadPhase.STARTING
    done: int | None = None
    total: int | None = None
    unit: str = ""
    phase_started: float = -1.0  # -1: `started`
    seconds: dict[str, float] = field(default_factory=dict)  # finished phases, by phase

    def __post_init__(self) -> None:
        if self.phase_started < 0:
            self.phase_started = self.started

    def report(self, msg: Progress, now: float | None = None) -> None:
        """Take one PROGRESS: a new phase closes the current one's clock."""
        now = time.monotonic() if now is None else now
        if msg.phase != self.phase:
            self._close_phase(now)
            self.phase, self.phase_started = msg.phase, now
        self.done, self.total, self.unit = msg.done, msg.total, msg.unit

    def view(self, now: float | None = None) -> dict[str, Any]:
        """The `progress` object of a loading model in /admin/status (a contract with the
        dashboard): `elapsed_s` counts from the start of the current phase."""
        now = time.monotonic() if now is None else now
        return {
            "phase": str(self.phase),
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "elapsed_s": round(max(0.0, now - self.phase_started), 1),
            "percent": percent(self.done, self.total),
        }

    def record(self, error: str | None = None, now: float | None = None) -> dict[str, Any]:
        """The finished load, for `last_load` in the status: how long in all and per phase
        (in the order they ran), and the error if it failed."""
        now = time.monotonic() if now is None else now
        self._close_phase(now)
        return {
            "ok": error is None,
            "error": error,
            "seconds": round(now - self.started, 2),
            "phases": dict(self.seconds),
            "finished_at": time.time(),
        }

    def _close_phase(self, now: float) -> None:
        key = str(self.phase)
        self.seconds[key] = round(self.seconds.get(key, 0.0) + now - self.phase_started, 2)
        self.phase_started = now


def phase_summary(phases: dict[str, float]) -> str:
    """'quantize 1.2s, load 0.3s, warmup 0.5s' (the start-up phase left out when short)."""
    return ", ".join(
        f"{name} {s:.1f}s"
        for name, s in phases.items()
        if not (name == LoadPhase.STARTING and s < 0.05)
    )
