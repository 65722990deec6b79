"""The worker processes of one supervisor: spawn, stop without waiting, reap.

Stopping never blocks the supervisor's poll loop: `stop` sends SIGTERM and remembers a
deadline, and `reap` (called every housekeeping turn) collects the processes that have
exited and SIGKILLs those still running past it. Until a stopped process has exited it is
`exiting`: the residency policy counts its memory as taken. Only `close`, at shutdown,
waits (bounded).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

from ..models import ModelSpec
from .process_group import signal_process
from .processes import (
    Spare,
    WorkerHandle,
    WorkerState,
    spawn_spare,
    spawn_worker,
)
from .residency import SpareState

log = logging.getLogger("mlxtg.supervisor")


@dataclass(slots=True)
class Exiting:
    """A stopped process that has not exited yet."""

    proc: subprocess.Popen[bytes]
    label: str  # for the log
    killed: bool  # SIGKILL sent
    deadline: float  # monotonic: SIGKILL then if only SIGTERMed, else stop waiting for it


class WorkerPool:
    """Owns the worker processes: the live workers by id, the standby spare, and the
    stopped processes until they have exited. `grace`: seconds between SIGTERM and SIGKILL,
    and again between SIGKILL and giving up on a process that will not die."""

    def __init__(self, endpoint: str, fast_blas: bool, grace: float = 5.0):
        self.endpoint = endpoint
        self.fast_blas = fast_blas
        self.grace = grace
        self.workers: dict[str, WorkerHandle] = {}
        self.spare: Spare | None = None
        self.exiting: list[Exiting] = []

    # --- start ---------------------------------------------------------------------------------

    def spawn(self, spec: ModelSpec) -> WorkerHandle:
        worker_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
        handle = spawn_worker(spec, worker_id, self.endpoint, self.fast_blas)
        self.workers[worker_id] = handle
        return handle

    def spawn_spare(self) -> None:
        self.spare = spawn_spare(f"standby-{uuid.uuid4().hex[:6]}", self.endpoint, self.fast_blas)

    def take_spare(self, spec: ModelSpec) -> WorkerHandle | None:
        """The standby process as a worker for `spec`, or None when it is not ready."""
        spare = self.spare
        if spare is None or not spare.ready or spare.proc.poll() is not None:
            return None
        if spec.distributed is not None:
            return None  # its ranks start together, with their environment
        self.spare = None
        handle = WorkerHandle(worker_id=spare.worker_id, spec=spec, proc=spare.proc)
        self.workers[handle.worker_id] = handle
        log.info("standby worker %s takes model %s", handle.worker_id, spec.name)
        return handle

    def spare_hello(self, worker_id: str) -> None:
        if self.spare is not None and self.spare.worker_id == worker_id:
            self.spare.ready = True

    def spare_state(self) -> SpareState:
        if self.spare is not None and self.spare.proc.poll() is not None:
            self.spare = None  # it died: the policy starts another
        if self.spare is None:
            return SpareState.NONE
        return SpareState.READY if self.spare.ready else SpareState.STARTING

    # --- look up -------------------------------------------------------------------------------

    def find(self, model: str) -> WorkerHandle | None:
        """The live worker of `model` (ready, loading or draining), if any."""
        for handle in self.workers.values():
            if handle.name == model:
                return handle
        return None

    def died(self) -> list[WorkerHandle]:
        """Live workers whose process exited without being stopped."""
        return [h for h in self.workers.values() if h.proc.poll() is not None]

    # --- stop ----------------------------------------------------------------------------------

    def stop(self, handle: WorkerHandle, now: float | None = None) -> None:
        """SIGTERM now; `reap` SIGKILLs it after the grace. Returns at once."""
        self._retire(handle, signal.SIGTERM, now)

    def kill(self, handle: WorkerHandle, now: float | None = None) -> None:
        """SIGKILL now (a hung worker: SIGKILL reaches a stopped process too)."""
        self._retire(handle, signal.SIGKILL, now)

    def forget(self, handle: WorkerHandle) -> None:
        """Drop a worker whose process has exited already."""
        handle.state = WorkerState.STOPPED
        self.workers.pop(handle.worker_id, None)

    def _retire(self, handle: WorkerHandle, sig: int, now: float | None) -> None:
        self.forget(handle)
        if handle.proc.poll() is not None:
            return
        signal_process(handle.proc, sig)
        now = time.monotonic() if now is None else now
        label = f"{handle.worker_id} (pid {handle.proc.pid})"
        self.exiting.append(Exiting(handle.proc, label, sig == signal.SIGKILL, now + self.grace))

    def reap(self, now: float | None = None) -> None:
        """Collect exited processes; SIGKILL the ones past their grace."""
        now = time.monotonic() if now is None else now
        still = []
        for e in self.exiting:
            if e.proc.poll() is not None:
                continue
            if now >= e.deadline:
                if e.killed:
                    # Stuck in the kernel: stop holding loads back for it.
                    log.error("worker %s did not exit after SIGKILL; no longer waiting", e.label)
                    continue
                log.warning("worker %s ignored SIGTERM: killing it", e.label)
                signal_process(e.proc, signal.SIGKILL)
                e.killed, e.deadline = True, now + self.grace
            still.append(e)
        self.exiting = still

    def close(self, timeout: float = 5.0) -> None:
        """Stop everything at shutdown: SIGTERM all at once, wait up to `timeout`, then
        SIGKILL what is left and wait up to `timeout` again."""
        procs = [h.proc for h in self.workers.values()] + [e.proc for e in self.exiting]
        if self.spare is not None:
            procs.append(self.spare.proc)
        self.workers.clear()
        self.spare = None
        self.exiting = []
        for proc in procs:
            signal_process(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_process(proc, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
