"""Operator control messages and the status report, answered from the supervisor's state.

The ops are an explicit enum (`ControlOp`): status, load, evict, cache stats, cache clear,
shutdown. Evictions go through the residency policy like every other.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..kv_files import clear_caches, list_caches
from ..models import ModelSpec
from ..protocol import Control, ControlOp, ControlReply
from .processes import WorkerState
from .residency import Drain, Evict, EvictRequest

if TYPE_CHECKING:
    from .core import Supervisor


class ModelCards:
    """Facts /v1/models reports even while a model is not loaded: its context length (the
    worker's, once it has loaded; else the local config.json's) and a creation time (the
    local folder's modification time; else when this server started)."""

    def __init__(self, started: float):
        self.started = started
        self._cards: dict[str, dict[str, Any]] = {}  # by model name

    def get(self, spec: ModelSpec) -> dict[str, Any]:
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

    def loaded(self, spec: ModelSpec, context_length: int) -> None:
        self.get(spec)
        self._cards[spec.name]["context_length"] = context_length


def answer(sup: Supervisor, msg: Control) -> ControlReply:
    """The reply to one control message."""

    def reply(ok: bool = True, error: str | None = None, **data: Any) -> ControlReply:
        return ControlReply(request_id=msg.request_id, ok=ok, data=data, error=error)

    op = msg.op  # a ControlOp: decoding refused anything else
    model = msg.args.get("model")
    if op == ControlOp.STATUS:
        return ControlReply(request_id=msg.request_id, ok=True, data=status(sup))
    if op == ControlOp.LOAD:
        name = str(msg.args.get("model", ""))
        if sup.settings.find(name) is None:
            return reply(False, f"unknown model {name!r}")
        if sup.pool.find(name) is None:
            sup.want(name)
        handle = sup.pool.find(name)
        state = str(handle.state) if handle else "waiting for a resident model to go idle"
        return reply(model=name, state=state)
    if op == ControlOp.EVICT:
        if model is not None and sup.settings.find(str(model)) is None:
            return reply(False, f"unknown model {model!r}")
        return reply(models=evict(sup, None if model is None else str(model)))
    if op == ControlOp.CACHE_STATS:
        live = {
            h.name: {"ram": h.stats.get("prefix_cache"), "disk": h.stats.get("disk_cache")}
            for h in sup.pool.workers.values()
        }
        return reply(resident=live, on_disk=list_caches())
    if op == ControlOp.CACHE_CLEAR:
        return reply(removed=cache_clear(sup, msg))
    if op == ControlOp.SHUTDOWN:
        sup.stopping = True
        return reply()
    return reply(False, f"{op} is not supported yet")


def evict(sup: Supervisor, model: str | None) -> dict[str, str]:
    """Evict the idle workers of `model` (every model when None); busy ones drain first."""
    names = {h.worker_id: h.name for h in sup.pool.workers.values()}
    result = {}
    for action in sup.decide(EvictRequest(model)):
        if isinstance(action, Evict | Drain):
            result[names[action.worker_id]] = "evicted" if isinstance(action, Evict) else "draining"
    return result


def cache_clear(sup: Supervisor, msg: Control) -> list[str]:
    """Clear the prompt caches of `model` (every model when None). A running worker clears
    its own, RAM and disk; deleting its folder under it would take the folder's meta.json
    and index too, so only the folders no running worker uses are removed here."""
    model = msg.args.get("model")
    running: dict[str, str] = {}  # fingerprint (= disk folder) -> model, of running workers
    for handle in sup.pool.workers.values():
        if handle.state in (WorkerState.READY, WorkerState.DRAINING):
            if fingerprint := handle.facts.get("fingerprint"):
                running[str(fingerprint)] = handle.name
            if model in (None, handle.name):
                sup.send_worker(handle, msg)
    removed = clear_caches(model, skip=frozenset(running))
    on_disk = {e["fingerprint"] for e in list_caches()}
    removed += [
        f"{name} ({fp})" for fp, name in running.items() if fp in on_disk and model in (None, name)
    ]
    return removed


def status(sup: Supervisor) -> dict[str, Any]:
    """The `mlxtg status` report: every configured model, its worker, the counters."""
    models = []
    for spec in sup.settings.models:
        handle = sup.pool.find(spec.name)
        entry: dict[str, Any] = {
            "name": spec.name,
            "source": spec.model_id_or_path,
            "quant": spec.quant,
            "pinned": spec.pinned,
            "state": "unloaded",
            "waiting": sup.router.waiting(spec.name),
            "progress": None,  # while loading: LoadProgress.view (the dashboard reads it)
            "last_load": sup.last_loads.get(spec.name),
        }
        entry.update(sup.cards.get(spec))
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
            entry["worker"] = handle.describe(sup.router.inflight(handle.worker_id))
            if handle.loading and handle.progress is not None:
                entry["progress"] = handle.progress.view()
        models.append(entry)
    return {
        "version": __version__,
        "supervisor": {"pid": os.getpid(), "uptime": time.time() - sup.started},
        "models": models,
        "counters": dict(sup.counters),
        "routes": len(sup.router.routes),
    }
