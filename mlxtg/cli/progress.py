"""Model load progress in a terminal: rich bars on a TTY, plain lines otherwise.

Both views take the same snapshot, `{model: progress}` with each progress as in
/admin/status (`phase`, `done`, `total`, `unit`, `elapsed_s`, `percent`), as often as the
caller likes: `mlxtg up` every turn of the supervisor's loop, `mlxtg load` every poll. A
model missing from a snapshot has finished (or failed) loading.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Snapshot = dict[str, dict[str, Any]]


def amount(n: int | float, unit: str) -> str:
    """A count in its unit: bytes in MiB or GiB, anything else as it is."""
    if unit == "bytes":
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    return f"{int(n)} {unit}".rstrip()


def describe(p: dict[str, Any]) -> str:
    """'quantize 5/13 layers (38.5%) 1.2s', 'download 12.0 MiB/1.50 GiB (0.8%) 9.0s',
    'warmup 0.4s'."""
    parts = [str(p.get("phase", "?"))]
    if counted := count(p):
        parts.append(counted)
    if p.get("percent") is not None:
        parts.append(f"({p['percent']:.0f}%)")
    parts.append(f"{float(p.get('elapsed_s') or 0.0):.1f}s")
    return " ".join(parts)


def count(p: dict[str, Any]) -> str:
    """'5/13 layers', '12.0 MiB/1.50 GiB', or '' when the phase has no count."""
    done, total, unit = p.get("done"), p.get("total"), p.get("unit") or ""
    if done is None:
        return ""
    if not total:
        return amount(done, unit)
    if unit == "bytes":
        return f"{amount(done, unit)}/{amount(total, unit)}"
    return f"{done}/{amount(total, unit)}"


class LoadView(Protocol):
    def show(self, loading: Snapshot) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Shown:
    phase: str
    at: float  # when its last line was written (the view's clock)


class PlainView:
    """One line per model at each phase change, and at most one every `every_s` seconds
    within a phase: log files and pipes get a readable history, not a flood."""

    def __init__(
        self,
        emit: Callable[[str], None],
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.emit = emit
        self.every_s = every_s
        self.clock = clock
        self._shown: dict[str, _Shown] = {}

    def show(self, loading: Snapshot) -> None:
        now = self.clock()
        for model in [m for m in self._shown if m not in loading]:
            del self._shown[model]
        for model, p in loading.items():
            last = self._shown.get(model)
            phase = str(p.get("phase"))
            if last is None or last.phase != phase or now - last.at >= self.every_s:
                self.emit(f"loading {model}: {describe(p)}")
                self._shown[model] = _Shown(phase, now)

    def close(self) -> None:
        self._shown.clear()


class RichView:
    """A rich progress display while anything loads: one bar per model and phase (the
    finished phases stay above the running one until the load ends)."""

    def __init__(self, console: Any = None):
        self.console = console
        self._progress: Any = None
        self._tasks: dict[str, tuple[str, Any, dict[str, Any]]] = {}  # model: phase, task, last

    def show(self, loading: Snapshot) -> None:
        if not loading:
            self.close()
            return
        if self._progress is None:
            self._progress = self._start()
        bars = self._progress
        for model in [m for m in self._tasks if m not in loading]:
            self._finish(model)
        for model, p in loading.items():
            phase = str(p.get("phase"))
            current = self._tasks.get(model)
            if current is None or current[0] != phase:
                if current is not None:
                    self._finish(model)
                task = bars.add_task(f"{model}: {phase}", total=p.get("total"), count="")
            else:
                task = current[1]
            self._tasks[model] = (phase, task, p)
            bars.update(task, completed=p.get("done") or 0, total=p.get("total"), count=count(p))

    def _finish(self, model: str) -> None:
        _, task, p = self._tasks.pop(model)
        total = p.get("total")
        # Done: a full bar (a phase of unknown length gets a total of one, done).
        self._progress.update(
            task, total=total or 1, completed=total or 1, count=count(p | {"done": total})
        )
        self._progress.stop_task(task)

    def _start(self) -> Any:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=self.console or Console(stderr=True),
        )
        bars.start()
        return bars

    def close(self) -> None:
        for model in list(self._tasks):
            self._finish(model)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def make_view(emit: Callable[[str], None], tty: bool | None = None) -> LoadView:
    """Rich bars when stderr is a terminal (and rich is there), plain lines through `emit`
    otherwise."""
    if tty is None:
        tty = sys.stderr.isatty()
    if tty:
        try:
            import rich  # noqa: F401  (typer's dependency; absent from a minimal install)

            return RichView()
        except ImportError:
            pass
    return PlainView(emit)


def _entry(status: dict[str, Any], model: str) -> dict[str, Any] | None:
    return next((m for m in status.get("models", []) if m.get("name") == model), None)


def follow(
    get_status: Callable[[], dict[str, Any]],
    model: str,
    view: LoadView,
    before: dict[str, Any] | None,
    poll_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, str]:
    """Show `model`'s load progress from /admin/status until it is loaded (True) or its
    load failed (False), with a line saying so. `before`: the model's `last_load` before
    the load was asked for, so an older failure is not taken for this one's."""
    try:
        while True:
            entry = _entry(get_status(), model)
            if entry is None:
                return False, f"{model}: not a configured model"
            last = entry.get("last_load")
            if entry.get("state") == "loaded":
                took = ""
                if last and last != before and last.get("ok"):
                    from ..supervisor.load_progress import phase_summary

                    took = f" in {last['seconds']:.1f}s ({phase_summary(last['phases'])})"
                return True, f"{model}: loaded{took}"
            if last and last != before and not last.get("ok"):
                return False, f"{model}: failed to load: {last.get('error')}"
            progress = entry.get("progress")
            view.show({model: progress} if progress else {})
            sleep(poll_s)
    finally:
        view.close()
