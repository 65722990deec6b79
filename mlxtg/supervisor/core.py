"""The supervisor: routes requests from the gateway to the worker of their model, spawns,
evicts and watches workers, and answers operator control messages.

Two ROUTER sockets: one the gateway connects to, one the workers connect to. A request
for a model that is not resident waits (bounded) while its worker loads; the least
recently used idle worker is evicted first when `max_resident_models` is reached. A busy
worker is never evicted under a running request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .. import __version__, paths
from ..kv_files import clear_caches, list_caches
from ..protocol import (
    Abort,
    Accepted,
    Config,
    Control,
    ControlOp,
    ControlReply,
    Error,
    Generate,
    Heartbeat,
    Hello,
    Message,
    Output,
    ProtocolError,
    Ready,
    decode,
    encode,
)
from ..worker.settings import EngineSettings
from .config import ServerSettings
from .processes import (
    Spare,
    WorkerHandle,
    WorkerState,
    spawn_spare,
    spawn_worker,
    stop_process,
    weights_bytes,
)
from .watchdog import hung_reason

log = logging.getLogger("mlxtg.supervisor")

CRASH_LIMIT, CRASH_WINDOW_S = 3, 120.0  # this many unexpected worker exits in this window: give up


@dataclass(slots=True)
class Route:
    gateway: bytes
    model: str
    choices_left: int


class Supervisor:
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
        self.workers: dict[str, WorkerHandle] = {}  # by worker id
        self.routes: dict[str, Route] = {}
        self.pending: dict[str, deque[tuple[bytes, Generate, float]]] = {}
        self.started = time.time()
        self._cards: dict[str, dict[str, Any]] = {}  # per model name, see _model_card
        self.stopping = False
        self.exit_code = 0
        self.spare: Spare | None = None
        self._crashes: dict[str, list[float]] = {}
        self.use_spare = (
            settings.standby_worker
            if settings.standby_worker is not None
            else len(settings.models) > 1
        )
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
        for handle in list(self.workers.values()):
            stop_process(handle.proc)
        if self.spare is not None:
            stop_process(self.spare.proc)
        self.workers.clear()
        self.front.close()
        self.back.close()
        self.ctx.term()
        for endpoint in (self.gateway_endpoint, self.worker_endpoint):
            with contextlib.suppress(OSError):
                os.unlink(endpoint.removeprefix("ipc://"))

    def warm_up(self) -> None:
        """Load the first configured model at start-up, so the first request is fast."""
        self._ensure_loading(self.settings.models[0].name)

    # --- gateway side --------------------------------------------------------------------------

    def _send_gateway(self, gateway: bytes, msg: Message) -> None:
        self.front.send_multipart([gateway, *encode(msg)])

    def _from_gateway(self, gateway: bytes, frames: list[bytes]) -> None:
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.error("malformed message from gateway: %s", exc)
            return
        if isinstance(msg, Generate):
            self._generate(gateway, msg)
        elif isinstance(msg, Abort):
            self._abort(msg)
        elif isinstance(msg, Control):
            try:
                reply = self._control(msg)
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
                    status=404,
                    message=f"The model '{msg.model}' does not exist. Served models: {names}",
                    param="model",
                    code="model_not_found",
                ),
            )
            return
        handle = self._worker_for(spec.name)
        if handle is not None and handle.state == WorkerState.READY:
            self._dispatch(handle, gateway, msg)
            return
        queue = self.pending.setdefault(spec.name, deque())
        if len(queue) >= self.settings.max_queued:
            self._send_gateway(
                gateway,
                Error(
                    request_id=msg.request_id,
                    status=429,
                    message=f"too many requests are waiting for model '{spec.name}' to load",
                    type="rate_limit_error",
                    code="queue_full",
                    retry_after=2.0,
                ),
            )
            return
        queue.append((gateway, msg, time.monotonic()))
        self._ensure_loading(spec.name)

    def _dispatch(self, handle: WorkerHandle, gateway: bytes, msg: Generate) -> None:
        self.routes[msg.request_id] = Route(gateway, handle.name, msg.n)
        handle.inflight.add(msg.request_id)
        handle.last_used = time.monotonic()
        self.back.send_multipart([handle.worker_id.encode(), *encode(msg)])

    def _abort(self, msg: Abort) -> None:
        route = self.routes.get(msg.request_id)
        if route is not None:
            handle = self._worker_for(route.model)
            if handle is not None:
                self.back.send_multipart([handle.worker_id.encode(), *encode(msg)])
            return
        for queue in self.pending.values():
            for item in list(queue):
                if item[1].request_id == msg.request_id:
                    queue.remove(item)

    # --- worker side ---------------------------------------------------------------------------

    def _from_worker(self, worker_id: str, frames: list[bytes]) -> None:
        handle = self.workers.get(worker_id)
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.error("malformed message from worker %s: %s", worker_id, exc)
            return
        if handle is None:
            if (
                self.spare is not None
                and worker_id == self.spare.worker_id
                and isinstance(msg, Hello)
            ):
                self.spare.ready = True
            return
        if isinstance(msg, Hello):
            self._send_config(handle)
        elif isinstance(msg, Ready):
            self._ready(handle, msg)
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
            self._forward_output(handle, frames, msg)
        elif isinstance(msg, Accepted | Error):
            route = self.routes.get(msg.request_id)
            if route is not None:
                self.front.send_multipart([route.gateway, *frames])
                if isinstance(msg, Error):
                    self._finish_route(handle, msg.request_id)

    def _send_config(self, handle: WorkerHandle) -> None:
        handle.state = WorkerState.LOADING
        worker_id = handle.worker_id
        spec, gb = handle.spec, 1 << 30

        def pick(own: Any, default: Any) -> Any:
            return own if own is not None else default

        engine = EngineSettings(
            max_batch=self.settings.max_batch,
            max_queued=self.settings.max_queued,
            prefill_chunk=self.settings.prefill_chunk,
            idle_prefill_chunk=self.settings.idle_prefill_chunk,
            batched_prefill=self.settings.batched_prefill,
            cache_ram_bytes=int(pick(spec.cache_ram_gb, self.settings.cache_ram_gb) * gb),
            cache_min_tokens=pick(spec.cache_min_tokens, self.settings.cache_min_tokens),
            cache_disk_bytes=int(pick(spec.cache_disk_gb, self.settings.cache_disk_gb) * gb),
            cache_slots=pick(spec.cache_slots, self.settings.cache_slots),
        )
        config = Config(worker_id=worker_id, model=handle.spec.to_wire(), engine=engine.to_wire())
        self.back.send_multipart([worker_id.encode(), *encode(config)])

    def _ready(self, handle: WorkerHandle, msg: Ready) -> None:
        if msg.error:
            log.error("model %s failed to load: %s", handle.name, msg.error)
            self.counters["load_failures"] += 1
            self._fail_pending(
                handle.name, 503, f"model '{handle.name}' failed to load: {msg.error}"
            )
            self._remove_worker(handle)
            return
        handle.state = WorkerState.READY
        handle.ready_at = time.time()
        handle.last_heartbeat = time.monotonic()  # the watchdog counts from here, not the spawn
        self._model_card(handle.spec)
        self._cards[handle.name]["context_length"] = msg.context_length
        handle.facts = {
            "context_length": msg.context_length,
            "fingerprint": msg.fingerprint,
            "vocab_size": msg.vocab_size,
            "blas": msg.blas,
            "load_seconds": msg.load_seconds,
        }
        self.counters["model_loads"] += 1
        log.info("model %s ready (worker BLAS: %s)", handle.name, msg.blas)
        for gateway, gen, _ in self.pending.pop(handle.name, deque()):
            self._dispatch(handle, gateway, gen)

    def _forward_output(self, handle: WorkerHandle, frames: list[bytes], msg: Output) -> None:
        gateways: set[bytes] = set()
        for delta in msg.deltas:
            route = self.routes.get(delta.request_id)
            if route is None:
                continue
            gateways.add(route.gateway)
            if delta.finish_reason is not None:
                route.choices_left -= 1
                if route.choices_left <= 0 or delta.finish_reason == "abort":
                    self._finish_route(handle, delta.request_id)
        if len(gateways) == 1:
            self.front.send_multipart([gateways.pop(), *frames])
        else:  # several gateways: each gets only its own deltas
            for gw in gateways:
                own = [
                    d
                    for d in msg.deltas
                    if (r := self.routes.get(d.request_id)) is None or r.gateway == gw
                ]
                self._send_gateway(gw, Output(deltas=own))

    def _finish_route(self, handle: WorkerHandle, request_id: str) -> None:
        self.routes.pop(request_id, None)
        handle.inflight.discard(request_id)
        handle.last_used = time.monotonic()

    # --- residency -----------------------------------------------------------------------------

    def _worker_for(self, model: str) -> WorkerHandle | None:
        for handle in self.workers.values():
            if handle.name == model and handle.state != WorkerState.STOPPED:
                return handle
        return None

    def _ensure_loading(self, model: str) -> None:
        if self._worker_for(model) is not None:
            return
        resident = [h for h in self.workers.values() if h.state != WorkerState.STOPPED]
        spec = self.settings.find(model)
        assert spec is not None
        if len(resident) >= self.settings.max_resident_models or self._over_budget(resident, spec):
            victims = sorted(
                (
                    h
                    for h in resident
                    if h.idle and not h.spec.pinned and h.state == WorkerState.READY
                ),
                key=lambda h: h.last_used,
            )
            if not victims:
                return  # retried from housekeeping once a worker goes idle
            self._evict(victims[0])
            if self._over_budget([h for h in resident if h is not victims[0]], spec):
                return  # evict one per turn: the next housekeeping turn evicts more
        spare = self.spare
        if spare is not None and spare.ready and spare.proc.poll() is None:
            # A standby worker has its imports done: it only has to load the weights.
            self.spare = None
            handle = WorkerHandle(worker_id=spare.worker_id, spec=spec, proc=spare.proc)
            self.workers[handle.worker_id] = handle
            log.info("standby worker %s takes model %s", handle.worker_id, spec.name)
            self._send_config(handle)
            return
        worker_id = f"{spec.name}-{uuid.uuid4().hex[:6]}"
        self.workers[worker_id] = spawn_worker(
            spec, worker_id, self.worker_endpoint, self.settings.fast_blas
        )

    def _over_budget(self, resident: list[WorkerHandle], spec: Any) -> bool:
        """Would loading `spec` next to `resident` exceed the memory budget? Resident
        workers count with their measured RSS, the newcomer with its weights' size."""
        budget = self.settings.memory_budget_gb
        if not budget or not resident:
            return False
        used = sum(h.describe().get("rss_bytes") or 0 for h in resident)
        return used + weights_bytes(spec) > budget * (1 << 30)

    def _evict(self, handle: WorkerHandle) -> None:
        log.info("evicting model %s (worker pid %d)", handle.name, handle.proc.pid)
        self.counters["evictions"] += 1
        self._remove_worker(handle)

    def _remove_worker(self, handle: WorkerHandle) -> None:
        handle.state = WorkerState.STOPPED
        stop_process(handle.proc)
        self.workers.pop(handle.worker_id, None)

    def _fail_pending(self, model: str, status: int, message: str) -> None:
        for gateway, gen, _ in self.pending.pop(model, deque()):
            self._send_gateway(
                gateway,
                Error(
                    request_id=gen.request_id, status=status, message=message, type="server_error"
                ),
            )

    def _keep_spare(self) -> None:
        """Keep one standby worker process (imports done, no model) when models can be
        switched, so a switch costs a weights load, not a Python start-up. Spawned only
        while no model is loading, so it never competes with a load for the CPU."""
        if not self.use_spare or self.stopping:
            return
        if self.spare is not None and self.spare.proc.poll() is not None:
            self.spare = None
        loading = any(
            h.state in (WorkerState.STARTING, WorkerState.LOADING) for h in self.workers.values()
        )
        if self.spare is None and not loading:
            self.spare = spawn_spare(
                f"standby-{uuid.uuid4().hex[:6]}", self.worker_endpoint, self.settings.fast_blas
            )

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._keep_spare()
        for handle in list(self.workers.values()):
            code = handle.proc.poll()
            if code is not None and handle.state != WorkerState.STOPPED:
                self._worker_died(handle, code)
            elif reason := self._hung(handle, now):
                self._worker_hung(handle, reason)
            elif handle.state == WorkerState.DRAINING and handle.idle:
                self._evict(handle)
            elif (
                handle.spec.idle_timeout
                and handle.state == WorkerState.READY
                and handle.idle
                and not handle.spec.pinned
                and now - handle.last_used > handle.spec.idle_timeout
            ):
                log.info(
                    "model %s idle for %.0fs: unloading", handle.name, handle.spec.idle_timeout
                )
                self._evict(handle)
        for model, queue in list(self.pending.items()):
            while queue and now - queue[0][2] > self.settings.load_timeout:
                gateway, gen, _ = queue.popleft()
                self._send_gateway(
                    gateway,
                    Error(
                        request_id=gen.request_id,
                        status=503,
                        message=f"model '{model}' did not become ready within {self.settings.load_timeout:.0f}s",
                        type="server_error",
                        retry_after=5.0,
                    ),
                )
            if queue:
                self._ensure_loading(model)

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
        (SIGKILL reaches a stopped process too) and respawn it."""
        log.error("worker for %s is hung: %s; killing pid %d", handle.name, reason, handle.proc.pid)
        self.counters["worker_hangs"] += 1
        handle.proc.kill()
        with contextlib.suppress(Exception):
            handle.proc.wait(timeout=5)
        self._worker_died(
            handle, handle.proc.returncode, f"the worker serving '{handle.name}' hung ({reason})"
        )

    def _worker_died(self, handle: WorkerHandle, code: int | None, why: str = "") -> None:
        if not why:
            log.error("worker for %s exited unexpectedly (code %s)", handle.name, code)
            why = f"the worker serving '{handle.name}' exited unexpectedly"
        self.counters["worker_restarts"] += 1
        for rid in list(handle.inflight):
            route = self.routes.pop(rid, None)
            if route is not None:
                self._send_gateway(
                    route.gateway,
                    Error(
                        request_id=rid,
                        status=503,
                        message=f"{why}; retry the request",
                        type="server_error",
                        code="worker_died",
                        retry_after=1.0,
                    ),
                )
        handle.state = WorkerState.STOPPED
        self.workers.pop(handle.worker_id, None)
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
            self._fail_pending(
                handle.name,
                503,
                f"the worker for '{handle.name}' exited while loading (code {code})",
            )
        elif not self.stopping:
            # It was serving: load it again now, so the model is back before the next
            # request rather than after it.
            self._ensure_loading(handle.name)

    # --- control -------------------------------------------------------------------------------

    def _control(self, msg: Control) -> ControlReply:
        try:
            op = ControlOp(msg.op)
        except ValueError:
            return ControlReply(
                request_id=msg.request_id, ok=False, error=f"unknown control op {msg.op!r}"
            )
        if op == ControlOp.STATUS:
            return ControlReply(request_id=msg.request_id, ok=True, data=self.status())
        if op == ControlOp.LOAD:
            name = str(msg.args.get("model", ""))
            if self.settings.find(name) is None:
                return ControlReply(
                    request_id=msg.request_id, ok=False, error=f"unknown model {name!r}"
                )
            self._ensure_loading(name)
            handle = self._worker_for(name)
            state = str(handle.state) if handle else "waiting for a resident model to go idle"
            return ControlReply(
                request_id=msg.request_id, ok=True, data={"model": name, "state": state}
            )
        if op == ControlOp.EVICT:
            return self._control_evict(msg)
        if op == ControlOp.CACHE_STATS:
            live = {
                h.name: {"ram": h.stats.get("prefix_cache"), "disk": h.stats.get("disk_cache")}
                for h in self.workers.values()
            }
            return ControlReply(
                request_id=msg.request_id,
                ok=True,
                data={"resident": live, "on_disk": list_caches()},
            )
        if op == ControlOp.CACHE_CLEAR:
            model = msg.args.get("model")
            for handle in self.workers.values():
                if model in (None, handle.name) and handle.state == WorkerState.READY:
                    self.back.send_multipart([handle.worker_id.encode(), *encode(msg)])
            return ControlReply(
                request_id=msg.request_id, ok=True, data={"removed": clear_caches(model)}
            )
        if op == ControlOp.SHUTDOWN:
            self.stopping = True
            return ControlReply(request_id=msg.request_id, ok=True)
        return ControlReply(request_id=msg.request_id, ok=False, error=f"{op} is not supported yet")

    def _control_evict(self, msg: Control) -> ControlReply:
        name = msg.args.get("model")
        targets = [h for h in self.workers.values() if name in (None, h.name)]
        if name is not None and self.settings.find(str(name)) is None:
            return ControlReply(
                request_id=msg.request_id, ok=False, error=f"unknown model {name!r}"
            )
        result = {}
        for handle in targets:
            if handle.idle:
                self._evict(handle)
                result[handle.name] = "evicted"
            else:
                handle.state = WorkerState.DRAINING
                result[handle.name] = "draining"
        return ControlReply(request_id=msg.request_id, ok=True, data={"models": result})

    def _model_card(self, spec: Any) -> dict[str, Any]:
        """Facts /v1/models reports even while a model is not loaded: its context length
        (the worker's, once it has loaded; else the local config.json's) and a creation
        time (the local folder's modification time; else when this server started)."""
        if spec.name not in self._cards:
            path = Path(spec.model_id_or_path)
            created, context = int(self.started), None
            with contextlib.suppress(OSError, ValueError):
                created = int(path.stat().st_mtime)
                config = json.loads((path / "config.json").read_text())
                for key in ("max_position_embeddings", "max_seq_len", "seq_length", "n_ctx"):
                    if isinstance(config.get(key), int):
                        context = config[key]
                        break
            self._cards[spec.name] = {"created": created, "context_length": context}
        return dict(self._cards[spec.name])

    def status(self) -> dict[str, Any]:
        resident = {h.name: h for h in self.workers.values()}
        models = []
        for spec in self.settings.models:
            handle = resident.get(spec.name)
            entry: dict[str, Any] = {
                "name": spec.name,
                "source": spec.model_id_or_path,
                "quant": spec.quant,
                "pinned": spec.pinned,
                "state": "unloaded",
                "waiting": len(self.pending.get(spec.name, ())),
            }
            entry.update(self._model_card(spec))
            if handle is not None:
                entry["state"] = (
                    "loaded"
                    if handle.state == WorkerState.READY
                    else (
                        "loading"
                        if handle.state in (WorkerState.STARTING, WorkerState.LOADING)
                        else str(handle.state)
                    )
                )
                entry["worker"] = handle.describe()
            models.append(entry)
        return {
            "version": __version__,
            "supervisor": {"pid": os.getpid(), "uptime": time.time() - self.started},
            "models": models,
            "counters": dict(self.counters),
            "routes": len(self.routes),
        }
