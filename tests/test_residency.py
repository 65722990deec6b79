"""The residency policy on plain snapshots: which worker to evict, when to load, the spare."""

from __future__ import annotations

from mlxtg.supervisor.processes import WorkerState
from mlxtg.supervisor.residency import (
    Drain,
    Evict,
    EvictRequest,
    Limits,
    Need,
    Residency,
    SpareState,
    Spawn,
    SpawnSpare,
    Tick,
    UseSpare,
    WorkerView,
    plan,
)

READY, LOADING, DRAINING = WorkerState.READY, WorkerState.LOADING, WorkerState.DRAINING
GB = 1 << 30


def worker(model: str, state: WorkerState = READY, **kw) -> WorkerView:
    return WorkerView(worker_id=f"{model}-w", model=model, state=state, **kw)


def state(*workers: WorkerView, limits: Limits | None = None, **kw) -> Residency:
    return Residency(now=1000.0, limits=limits or Limits(), workers=workers, **kw)


def test_a_free_slot_spawns_and_a_ready_spare_is_used_instead():
    assert plan(state(), Need("a")) == [Spawn("a")]
    assert plan(state(spare=SpareState.READY), Need("a")) == [UseSpare("a")]
    assert plan(state(spare=SpareState.STARTING), Need("a")) == [Spawn("a")]
    # A model that has a worker, in any state, needs nothing.
    assert plan(state(worker("a", LOADING)), Need("a")) == []
    assert plan(state(worker("a", DRAINING, idle=False)), Need("a")) == []


def test_the_least_recently_used_idle_worker_is_evicted():
    two = Limits(max_resident=2)
    s = state(worker("a", last_used=50.0), worker("b", last_used=10.0), limits=two)
    assert plan(s, Need("c")) == [Evict("b-w", "to make room for c")]
    s = state(worker("a", last_used=5.0), worker("b", last_used=10.0), limits=two)
    assert plan(s, Need("c")) == [Evict("a-w", "to make room for c")]


def test_pinned_busy_and_loading_workers_are_never_evicted():
    two = Limits(max_resident=2)
    s = state(worker("a", pinned=True, last_used=1.0), worker("b", last_used=9.0), limits=two)
    assert plan(s, Need("c")) == [Evict("b-w", "to make room for c")]
    s = state(worker("a", idle=False, last_used=1.0), worker("b", last_used=9.0), limits=two)
    assert plan(s, Need("c")) == [Evict("b-w", "to make room for c")]
    # Nothing evictable: the request waits; a later turn retries.
    s = state(worker("a", pinned=True), worker("b", idle=False), limits=two)
    assert plan(s, Need("c")) == []
    assert plan(state(worker("a", LOADING)), Need("c")) == []


def test_nothing_loads_or_is_evicted_while_an_evicted_process_is_still_exiting():
    assert plan(state(exiting=1), Need("a")) == []
    assert plan(state(worker("b"), exiting=1), Need("a")) == []
    # Once it has exited, the load goes ahead.
    assert plan(state(), Tick()) == []
    assert plan(state(wanted=("a",)), Tick()) == [Spawn("a")]


def test_the_memory_budget_evicts_one_worker_per_turn_until_the_newcomer_fits():
    limits = Limits(max_resident=3, memory_budget=10 * GB)
    a = worker("a", rss=4 * GB, last_used=1.0)
    b = worker("b", rss=4 * GB, last_used=2.0)
    weights = {"c": 5 * GB}
    s = state(a, b, limits=limits, wanted=("c",), weights=weights)
    assert plan(s, Tick()) == [Evict("a-w", "to make room for c")]
    # While a exits nothing more happens; after, b's 4 GB + 5 GB fit: no second eviction.
    assert plan(state(b, limits=limits, exiting=1, wanted=("c",), weights=weights), Tick()) == []
    assert plan(state(b, limits=limits, wanted=("c",), weights=weights), Tick()) == [Spawn("c")]
    # 8 GB newcomer: b must go too, on the next turn.
    big = {"c": 8 * GB}
    assert plan(state(b, limits=limits, wanted=("c",), weights=big), Tick()) == [
        Evict("b-w", "to make room for c")
    ]
    # A model alone may always load, however large.
    assert plan(state(limits=limits, wanted=("c",), weights={"c": 50 * GB}), Tick()) == [Spawn("c")]


def test_several_wanted_models_fill_free_slots_in_order():
    limits = Limits(max_resident=3)
    s = state(worker("a"), limits=limits, wanted=("b", "c", "b"), spare=SpareState.READY)
    assert plan(s, Tick()) == [UseSpare("b"), Spawn("c")]
    # One slot left for two: the second waits for the first (loading, so no victim).
    s = state(worker("a", idle=False), limits=Limits(max_resident=2), wanted=("b", "c"))
    assert plan(s, Tick()) == [Spawn("b")]


def test_idle_timeout_unloads_idle_unpinned_ready_workers_only():
    def s(**kw) -> Residency:
        return state(worker("a", idle_timeout=60.0, **kw))

    assert plan(s(last_used=900.0), Tick()) == [Evict("a-w", "idle for 60s")]
    assert plan(s(last_used=990.0), Tick()) == []
    assert plan(s(last_used=900.0, idle=False), Tick()) == []
    assert plan(s(last_used=900.0, pinned=True), Tick()) == []
    assert plan(state(worker("a", last_used=0.0)), Tick()) == []  # no timeout set


def test_a_draining_worker_is_evicted_once_idle_and_a_retiring_turn_loads_nothing():
    busy = worker("a", DRAINING, idle=False)
    assert plan(state(busy, wanted=("b",)), Tick()) == []
    idle = worker("a", DRAINING)
    assert plan(state(idle, wanted=("b",)), Tick()) == [Evict("a-w", "drained")]


def test_operator_evict_stops_idle_workers_and_drains_busy_ones():
    s = state(worker("a"), worker("b", idle=False), limits=Limits(max_resident=2))
    assert plan(s, EvictRequest()) == [Evict("a-w", "operator"), Drain("b-w")]
    assert plan(s, EvictRequest("b")) == [Drain("b-w")]
    assert plan(s, EvictRequest("c")) == []


def test_the_spare_is_started_only_while_nothing_loads():
    on = Limits(max_resident=2, standby=True)
    assert plan(state(limits=on), Tick()) == [SpawnSpare()]
    assert plan(state(worker("a"), limits=on), Tick()) == [SpawnSpare()]
    assert plan(state(worker("a", LOADING), limits=on), Tick()) == []
    assert plan(state(worker("a", WorkerState.STARTING), limits=on), Tick()) == []
    # Not in the turn a load starts, not when one exists, not when off or shutting down.
    assert plan(state(limits=on, wanted=("a",)), Tick()) == [Spawn("a")]
    assert plan(state(limits=on, spare=SpareState.STARTING), Tick()) == []
    assert plan(state(), Tick()) == []
    assert plan(state(limits=on, shutting_down=True), Tick()) == []
    # A request's Need never starts a spare; only housekeeping turns do.
    assert plan(state(limits=on), Need("a")) == [Spawn("a")]
