"""Several child processes that the supervisor signals and watches as one."""

from __future__ import annotations

import contextlib
import subprocess


def signal_process(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` unless the process has exited (and been reaped) already."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


class ProcessGroup:
    """The part of `Popen` the supervisor uses for one child, over several: the first
    process's pid stands for the group, and a signal goes to every process still running.
    Subclasses say when the group has exited (`poll`)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]):
        self.procs = procs
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def send_signal(self, sig: int) -> None:
        for p in self.procs:
            signal_process(p, sig)
