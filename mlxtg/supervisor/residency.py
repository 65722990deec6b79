"""Which models are resident: a pure policy, `plan(state, event) -> actions`.

The supervisor takes a snapshot of its workers (`Residency`), asks `plan` what to do on an
event, and executes the actions. Nothing here touches a process, a socket or the clock, so
every rule is unit-tested on plain values (tests/test_residency.py).

The rules:
- a model that is wanted (requests wait for it, an operator asked to load it, its worker
  died while serving) gets a worker when a slot is free: `max_resident_models` workers, and
  with `memory_budget_gb` the resident workers' RSS plus the newcomer's weights within it;
- otherwise the least recently used idle worker is evicted: never a pinned one, never one
  serving a request, never one still loading. One eviction at a time: while an evicted
  process is still exiting its memory is not back, so nothing new loads and nothing more is
  evicted until it has exited;
- an idle worker unloads after its model's `idle_timeout` (unless pinned), and a draining
  worker is stopped once its last request finished;
- with the standby worker on, one spare process is kept, started only while nothing loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .processes import WorkerState


class SpareState(StrEnum):
    NONE = "none"
    STARTING = "starting"  # spawned, no HELLO yet
    READY = "ready"  # imports done, waiting for a model


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the policy knows of one worker."""

    worker_id: str
    model: str
    state: WorkerState
    idle: bool = True  # no request in flight
    pinned: bool = False
    last_used: float = 0.0  # monotonic seconds
    rss: int = 0  # bytes; 0 when unknown or not measured (no memory budget)
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """The server settings the policy applies."""

    max_resident: int = 1
    memory_budget: int | None = None  # bytes
    standby: bool = False


@dataclass(frozen=True, slots=True)
class Residency:
    """A snapshot: the live workers, the stopped processes still exiting, the wanted models."""

    now: float
    limits: Limits = field(default_factory=Limits)
    workers: tuple[WorkerView, ...] = ()
    exiting: int = 0  # stopped worker processes that have not exited yet
    wanted: tuple[str, ...] = ()  # models that should get a worker, in the order asked
    weights: dict[str, int] = field(default_factory=dict)  # bytes a wanted model will take
    spare: SpareState = SpareState.NONE
    shutting_down: bool = False


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """A housekeeping turn: time passed, processes may have exited."""


@dataclass(frozen=True, slots=True)
class Need:
    """A request (or an operator's load) wants `model` now."""

    model: str


@dataclass(frozen=True, slots=True)
class EvictRequest:
    """An operator asked to evict `model` (every model when None)."""

    model: str | None = None


Event = Tick | Need | EvictRequest

# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start a new worker process for `model`."""

    model: str


@dataclass(frozen=True, slots=True)
class UseSpare:
    """Hand `model` to the standby worker (it only has to load the weights)."""

    model: str


@dataclass(frozen=True, slots=True)
class SpawnSpare:
    """Start a standby worker process."""


@dataclass(frozen=True, slots=True)
class Evict:
    """Stop a worker and free its memory; `why` is for the log."""

    worker_id: str
    why: str


@dataclass(frozen=True, slots=True)
class Drain:
    """Take no new requests on this worker; it is evicted once idle."""

    worker_id: str


Action = Spawn | UseSpare | SpawnSpare | Evict | Drain

LOADING = (WorkerState.STARTING, WorkerState.LOADING)


def plan(state: Residency, event: Event) -> list[Action]:
    """What to do about `event` in `state`."""
    if isinstance(event, EvictRequest):
        return _operator_evict(state, event.model)
    actions: list[Action] = []
    if isinstance(event, Tick):
        actions += _retire(state)
    wanted = state.wanted if isinstance(event, Tick) else (event.model,)
    if not actions:  # a turn that stops a worker waits for it to exit before loading
        actions += _load(state, wanted)
    if isinstance(event, Tick):
        actions += _keep_spare(state, actions)
    return actions


def _operator_evict(state: Residency, model: str | None) -> list[Action]:
    actions: list[Action] = []
    for w in state.workers:
        if model in (None, w.model):
            actions.append(Evict(w.worker_id, "operator") if w.idle else Drain(w.worker_id))
    return actions


def _retire(state: Residency) -> list[Action]:
    """Drained workers that went idle, and idle workers past their model's idle_timeout."""
    actions: list[Action] = []
    for w in state.workers:
        if w.state == WorkerState.DRAINING and w.idle:
            actions.append(Evict(w.worker_id, "drained"))
        elif (
            w.idle_timeout
            and w.state == WorkerState.READY
            and w.idle
            and not w.pinned
            and state.now - w.last_used > w.idle_timeout
        ):
            actions.append(Evict(w.worker_id, f"idle for {w.idle_timeout:g}s"))
    return actions


def _load(state: Residency, wanted: tuple[str, ...]) -> list[Action]:
    """Workers for the wanted models that have none: spawn while a slot is free, else
    evict one victim and stop (the load follows once its process has exited)."""
    if state.exiting:
        return []
    limits = state.limits
    have = {w.model for w in state.workers}
    resident = list(state.workers)
    used = sum(w.rss for w in resident)
    spare = state.spare == SpareState.READY
    actions: list[Action] = []
    for model in dict.fromkeys(wanted):  # in order, once each
        if model in have:
            continue
        weights = state.weights.get(model, 0)
        if len(resident) >= limits.max_resident or _over(limits, resident, used, weights):
            victims = sorted(
                (w for w in resident if w.idle and not w.pinned and w.state == WorkerState.READY),
                key=lambda w: w.last_used,
            )
            if victims:
                actions.append(Evict(victims[0].worker_id, f"to make room for {model}"))
            # No victim: every resident worker is busy, pinned or loading; a later turn retries.
            return actions
        actions.append(UseSpare(model) if spare else Spawn(model))
        spare = False
        have.add(model)
        # The newcomer holds a slot and, for the budget, its weights.
        resident.append(WorkerView(worker_id="", model=model, state=WorkerState.STARTING))
        used += weights
    return actions


def _over(limits: Limits, resident: list[WorkerView], used: int, weights: int) -> bool:
    """Would `weights` more exceed the memory budget? A model alone always may load."""
    return bool(limits.memory_budget and resident and used + weights > limits.memory_budget)


def _keep_spare(state: Residency, planned: list[Action]) -> list[Action]:
    """One standby process, started only while no model loads (it would compete for the
    CPU) and not while the server shuts down."""
    if not state.limits.standby or state.shutting_down or state.spare != SpareState.NONE:
        return []
    if any(w.state in LOADING for w in state.workers):
        return []
    if any(isinstance(a, Spawn | UseSpare) for a in planned):
        return []
    return [SpawnSpare()]
