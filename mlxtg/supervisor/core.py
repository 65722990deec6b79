"""The supervisor: the process between the gateway and the workers.

Two ROUTER sockets: one the gateway connects to, one the workers connect to. The
supervisor is the mechanism around three pieces of state with one owner each:
- `Router` (router.py): where each request's messages go, and the requests waiting for a
  model to load;
- `WorkerPool` (pool.py): the worker processes, stopped without blocking this loop;
- the residency policy (residency.py): a pure `plan(state, event) -> actions` that decides
  what to spawn and evict; this class takes the snapshot and executes the actions.
It also watches workers (watchdog.py), answers operator control messages and reports status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import zmq

from .. import paths
from ..protocol import (
    Abort,
    Accepted,
    Control,
    ControlReply,
    Error,
    ErrorKind,
    Generate,
    Heartbeat,
    Hello,
    Message,
    MsgType,
    Output,
    Progress,
    ProtocolError,
    Ready,
    decode,
    encode,
    request_id_of,
)
from . import control
from .config import ServerSettings
from .control import ModelCards
from .load_progress import phase_summary
from .pool import WorkerPool
from .processes import WorkerHandle, WorkerState, rss_bytes, weights_bytes, worker_config
from .residency import (
    Action,
    Drain,
    Event,
    Evict,
    Limits,
    Need,
    Residency,
    Spawn,
    SpawnSpare,
    Tick,
    UseSpare,
    WorkerView,
    plan,
)
from .router import Router
from .watchdog import hung_reason

log = logging.getLogger("mlxtg.supervisor")

CRASH_LIMIT, CRASH_WINDOW_S = 3, 120.0  # this many unexpected worker exits in this window: give up


class Supervisor:
    """Routes requests to the worker of their model, keeps the right models resident,
    watches the workers and answers control messages. The CLI calls `step` until
    `stopping`, then `close`."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.ctx = zmq.Context()
        self.gateway_endpoint = paths.ipc_endpoint("gateway")
        self.worker_endpoint = paths.ipc_endpoint("workers")
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.bind(self.gateway_endpoint)
        self.back = self.ctx.socket(zmq.ROUTER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.bind(self.worker_endpoint)
        self.pool = WorkerPool(self.worker_endpoint, settings.fast_blas)
        self.router = Router(settings.max_queued)
        # Models to load with no request waiting: an operator's LOAD, a serving worker that died.
        self.wanted: dict[str, None] = {}
        budget = settings.memory_budget_gb
        self.limits = Limits(
            max_resident=settings.max_resident_models,
            memory_budget=int(budget * (1 << 30)) if budget else None,
            standby=(
                settings.standby_worker
                if settings.standby_worker is not None
                else len(settings.models) > 1
            ),
        )
        self._weights: dict[str, int] = {}  # per model, measured once
        # Per model, its last finished load (ok or not): phase timings outlive the progress.
        self.last_loads: dict[str, dict[str, Any]] = {}
        self.started = time.time()
        self.cards = ModelCards(self.started)
        self.stopping = False
        self.exit_code = 0
        self._crashes: dict[str, list[float]] = {}
        self.counters = {
            "model_loads": 0,
            "evictions": 0,
            "worker_restarts": 0,
            "worker_hangs": 0,
            "load_failures": 0,
        }

    # --- lifecycle -----------------------------------------------------------------------------

    def step(self, timeout_ms: int = 100) -> None:
        """One turn of the event loop (the CLI calls this until `stopping`)."""
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        if self.back in events:
            while self.back.poll(0):
                ident, *frames = self.back.recv_multipart()
                self._from_worker(ident.decode(), frames)
        if self.front in events:
            while self.front.poll(0):
                ident, *frames = self.front.recv_multipart()
                self._from_gateway(ident, frames)
        self._housekeeping()

    def close(self) -> None:
        self.pool.close()
        self.front.close()
        self.back.close()
        self.ctx.term()
        for endpoint in (self.gateway_endpoint, self.worker_endpoint):
            with contextlib.suppress(OSError):
                os.unlink(endpoint.removeprefix("ipc://"))

    def status(self) -> dict[str, Any]:
        """What `mlxtg status` shows (control.status)."""
        return control.status(self)

    def loading(self) -> dict[str, dict[str, Any]]:
        """The progress of every model loading now (LoadProgress.view), by model."""
        return {
            h.name: h.progress.view()
            for h in self.pool.workers.values()
            if h.loading and h.progress is not None
        }

    def warm_up(self) -> None:
        """Load the first configured model at start-up, so the first request is fast."""
        self.want(self.settings.models[0].name)

    # --- gateway side --------------------------------------------------------------------------

    def _send_gateway(self, gateway: bytes, msg: Message) -> None:
        self.front.send_multipart([gateway, *encode(msg)])

    def _refuse_unreadable(self, gateway: bytes, frames: list[bytes], exc: Exception) -> None:
        """Answer a message that did not decode but names its request (a gateway of another
        version, a bug): its client gets an error instead of waiting for nothing."""
        kind = bytes(frames[0]) if frames else b""
        rid = request_id_of(frames)
        if rid is None or kind not in (b"GENERATE", b"CONTROL"):
            return
        why = f"the supervisor could not read this request (a version mismatch?): {exc}"
        if kind == MsgType.CONTROL.value.encode():
            self._send_gateway(gateway, ControlReply(request_id=rid, ok=False, error=why))
        else:
            self._send_gateway(
                gateway, Error(request_id=rid, kind=ErrorKind.INTERNAL, message=why)
            )

    def send_worker(self, handle: WorkerHandle, msg: Message) -> None:
        self.back.send_multipart([handle.worker_id.encode(), *encode(msg)])

    def _from_gateway(self, gateway: bytes, frames: list[bytes]) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.error("malformed message from gateway: %s", exc)
            self._refuse_unreadable(gateway, frames, exc)
            return
        if isinstance(msg, Generate):
            self._generate(gateway, msg)
        elif isinstance(msg, Abort):
            self._abort(msg)
        elif isinstance(msg, Control):
            try:
                reply = control.answer(self, msg)
            except Exception as exc:  # an operator action must never take the server down
                log.exception("control %s failed", msg.op)
                reply = ControlReply(
                    request_id=msg.request_id, ok=False, error=f"{msg.op} failed: {exc}"
                )
            self._send_gateway(gateway, reply)

    def _generate(self, gateway: bytes, msg: Generate) -> None:
        spec = self.settings.find(msg.model)
        if spec is None:
            names = ", ".join(self.settings.model_names())
            self._send_gateway(
                gateway,
                Error(
                    request_id=msg.request_id,
                    kind=ErrorKind.MODEL_NOT_FOUND,
                    message=f"The model '{msg.model}' does not exist. Served models: {names}",
                    param="model",
                ),
            )
            return
        handle = self.pool.find(spec.name)
        if handle is not None and handle.state == WorkerState.READY:
            self._dispatch(handle, gateway, msg)
        elif self.router.enqueue(spec.name, gateway, msg, time.monotonic()):
            self.decide(Need(spec.name))
        else:
            self._send_gateway(
                gateway,
                Error(
                    request_id=msg.request_id,
                    kind=ErrorKind.QUEUE_FULL,
                    message=f"too many requests are waiting for model '{spec.name}' to load",
                    retry_after=2.0,
                ),
            )

    def _dispatch(self, handle: WorkerHandle, gateway: bytes, msg: Generate) -> None:
        self.router.add(gateway, handle.worker_id, msg)
        handle.last_used = time.monotonic()
        self.send_worker(handle, msg)

    def _abort(self, msg: Abort) -> None:
        route = self.router.get(msg.request_id)
        if route is None:
            self.router.cancel(msg.request_id)  # still waiting for its model: just drop it
        elif (handle := self.pool.workers.get(route.worker_id)) is not None:
            self.send_worker(handle, msg)

    # --- worker side ---------------------------------------------------------------------------

    def _from_worker(self, worker_id: str, frames: list[bytes]) -> None:
        handle = self.pool.workers.get(worker_id)
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.error("malformed message from worker %s: %s", worker_id, exc)
            return
        if handle is None:
            if isinstance(msg, Hello):
                self.pool.spare_hello(worker_id)
            return  # otherwise a stopped worker's last words
        if isinstance(msg, Hello):
            self._send_config(handle)
        elif isinstance(msg, Ready):
            self._ready(handle, msg)
        elif isinstance(msg, Progress):
            if handle.progress is not None:
                handle.progress.report(msg)
        elif isinstance(msg, Heartbeat):
            now = time.monotonic()
            prev, prev_at = handle.stats.get("tokens_generated", 0), handle.last_heartbeat
            if now > prev_at:
                msg.stats["tokens_per_s"] = round(
                    (msg.stats.get("tokens_generated", 0) - prev) / (now - prev_at), 1
                )
            handle.stats = msg.stats
            handle.last_heartbeat = now
        elif isinstance(msg, Output):
            self._forward_output(frames, msg)
        elif isinstance(msg, Accepted | Error):
            route = self.router.get(msg.request_id)
            if route is not None:
                self.front.send_multipart([route.gateway, *frames])
                if isinstance(msg, Error):
                    self._finish(msg.request_id)

    def _send_config(self, handle: WorkerHandle) -> None:
        handle.state = WorkerState.LOADING
        self.send_worker(handle, worker_config(handle, self.settings))

    def _load_finished(self, handle: WorkerHandle, error: str | None = None) -> str:
        """Keep the load's record (its phase timings) and drop its progress; the record
        as words for the log."""
        if handle.progress is None:
            return ""
        record = handle.progress.record(error)
        handle.progress = None
        self.last_loads[handle.name] = record
        return f"in {record['seconds']:.1f}s: {phase_summary(record['phases'])}"

    def _ready(self, handle: WorkerHandle, msg: Ready) -> None:
        took = self._load_finished(handle, msg.error)
        if msg.error:
            log.error("model %s failed to load: %s", handle.name, msg.error)
            self.counters["load_failures"] += 1
            self._fail_pending(handle.name, f"model '{handle.name}' failed to load: {msg.error}")
            self.wanted.pop(handle.name, None)
            self.pool.stop(handle)
            return
        handle.state = WorkerState.READY
        handle.ready_at = time.time()
        handle.last_heartbeat = time.monotonic()  # the watchdog counts from here, not the spawn
        self.cards.loaded(handle.spec, msg.context_length)
        handle.facts = {
            "context_length": msg.context_length,
            "fingerprint": msg.fingerprint,
            "vocab_size": msg.vocab_size,
            "blas": msg.blas,
            "reasoning": msg.reasoning,
            "load_seconds": msg.load_seconds,
        }
        self.counters["model_loads"] += 1
        log.info("model %s ready %s (worker BLAS: %s)", handle.name, took, msg.blas)
        for waiting in self.router.take(handle.name):
            self._dispatch(handle, waiting.gateway, waiting.msg)

    def _forward_output(self, frames: list[bytes], msg: Output) -> None:
        per_gateway, finished = self.router.split(msg.deltas)
        if len(per_gateway) == 1 and sum(map(len, per_gateway.values())) == len(msg.deltas):
            self.front.send_multipart([next(iter(per_gateway)), *frames])  # as received
        else:  # several gateways: each gets only its own deltas
            for gateway, deltas in per_gateway.items():
                self._send_gateway(gateway, Output(deltas=deltas))
        for request_id in finished:
            self._finish(request_id)

    def _finish(self, request_id: str) -> None:
        route = self.router.finish(request_id)
        if route is not None and (handle := self.pool.workers.get(route.worker_id)):
            handle.last_used = time.monotonic()

    # --- residency: snapshot, plan, act --------------------------------------------------------

    def want(self, model: str) -> None:
        """Load `model` even with no request waiting (retried every turn until it spawns)."""
        self.wanted[model] = None
        self.decide(Need(model))

    def decide(self, event: Event) -> list[Action]:
        actions = plan(self._residency(), event)
        for action in actions:
            self._act(action)
        return actions

    def _residency(self) -> Residency:
        measure = self.limits.memory_budget is not None  # RSS and weights only for a budget
        workers = tuple(
            WorkerView(
                worker_id=h.worker_id,
                model=h.name,
                state=h.state,
                idle=self.router.inflight(h.worker_id) == 0,
                pinned=h.spec.pinned,
                last_used=h.last_used,
                rss=(rss_bytes(h.proc.pid) or 0) if measure else 0,
                idle_timeout=h.spec.idle_timeout,
            )
            for h in self.pool.workers.values()
        )
        wanted = tuple(dict.fromkeys([*self.router.waiting_models(), *self.wanted]))
        return Residency(
            now=time.monotonic(),
            limits=self.limits,
            workers=workers,
            exiting=len(self.pool.exiting),
            wanted=wanted,
            weights={m: self._weights_of(m) for m in wanted} if measure else {},
            spare=self.pool.spare_state(),
            shutting_down=self.stopping,
        )

    def _weights_of(self, model: str) -> int:
        if model not in self._weights:
            spec = self.settings.find(model)
            self._weights[model] = weights_bytes(spec) if spec is not None else 0
        return self._weights[model]

    def _act(self, action: Action) -> None:
        if isinstance(action, Spawn | UseSpare):
            spec = self.settings.find(action.model)
            if spec is None:
                return
            self.wanted.pop(spec.name, None)
            handle = self.pool.take_spare(spec) if isinstance(action, UseSpare) else None
            if handle is not None:
                self._send_config(handle)  # the standby worker said HELLO long ago
            else:
                self.pool.spawn(spec)
        elif isinstance(action, SpawnSpare):
            self.pool.spawn_spare()
        elif isinstance(action, Evict):
            if (handle := self.pool.workers.get(action.worker_id)) is not None:
                log.info(
                    "evicting model %s (worker pid %d): %s",
                    handle.name,
                    handle.proc.pid,
                    action.why,
                )
                self.counters["evictions"] += 1
                self.pool.stop(handle)
        elif isinstance(action, Drain) and (handle := self.pool.workers.get(action.worker_id)):
            handle.state = WorkerState.DRAINING

    # --- housekeeping and failures -------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self.pool.reap(now)
        for handle in self.pool.died():
            self._worker_died(handle, handle.proc.returncode)
        for handle in list(self.pool.workers.values()):
            if reason := self._hung(handle, now):
                self._worker_hung(handle, reason)
        timeout = self.settings.load_timeout
        for model, waiting in self.router.expired(now, timeout):
            self._send_gateway(
                waiting.gateway,
                Error(
                    request_id=waiting.msg.request_id,
                    kind=ErrorKind.UNAVAILABLE,
                    message=f"model '{model}' did not become ready within {timeout:.0f}s",
                    retry_after=5.0,
                ),
            )
        self.decide(Tick())

    def _fail_pending(self, model: str, message: str) -> None:
        """Requests waiting for `model` to load get 503s: it will not load."""
        for waiting in self.router.take(model):
            self._send_gateway(
                waiting.gateway,
                Error(
                    request_id=waiting.msg.request_id,
                    kind=ErrorKind.UNAVAILABLE,
                    message=message,
                ),
            )

    def _hung(self, handle: WorkerHandle, now: float) -> str | None:
        if handle.state not in (WorkerState.READY, WorkerState.DRAINING):
            return None  # loading is bounded by load_timeout, not heartbeats
        return hung_reason(
            now - handle.last_heartbeat,
            handle.stats,
            self.settings.heartbeat_timeout,
            self.settings.stall_timeout,
        )

    def _worker_hung(self, handle: WorkerHandle, reason: str) -> None:
        """A worker that stopped serving without exiting: fail its requests, kill it
        (SIGKILL reaches a stopped process too; the pool reaps it) and respawn it."""
        log.error("worker for %s is hung: %s; killing pid %d", handle.name, reason, handle.proc.pid)
        self.counters["worker_hangs"] += 1
        self.pool.kill(handle)
        self._worker_died(handle, None, f"the worker serving '{handle.name}' hung ({reason})")

    def _worker_died(self, handle: WorkerHandle, code: int | None, why: str = "") -> None:
        if not why:
            log.error("worker for %s exited unexpectedly (code %s)", handle.name, code)
            why = f"the worker serving '{handle.name}' exited unexpectedly"
        self.counters["worker_restarts"] += 1
        for rid, route in self.router.drop_worker(handle.worker_id):
            self._send_gateway(
                route.gateway,
                Error(
                    request_id=rid,
                    kind=ErrorKind.UNAVAILABLE,
                    message=f"{why}; retry the request",
                    code="worker_died",
                    retry_after=1.0,
                ),
            )
        self.pool.forget(handle)
        # A crash loop cannot be recovered here: exit non-zero so the service manager
        # (launchd / systemd) restarts everything.
        now = time.monotonic()
        recent = [t for t in self._crashes.get(handle.name, []) if now - t < CRASH_WINDOW_S]
        self._crashes[handle.name] = [*recent, now]
        if len(recent) + 1 >= CRASH_LIMIT:
            log.error(
                "the worker for %s died %d times in %.0fs: giving up",
                handle.name,
                CRASH_LIMIT,
                CRASH_WINDOW_S,
            )
            self.exit_code = 1
            self.stopping = True
        if handle.ready_at is None:
            self._load_finished(handle, f"the worker exited while loading (code {code})")
            self.wanted.pop(handle.name, None)
            self._fail_pending(
                handle.name,
                f"the worker for '{handle.name}' exited while loading (code {code})",
            )
        elif not self.stopping:
            # It was serving: load it again now, so the model is back before the next
            # request rather than after it.
            self.want(handle.name)
