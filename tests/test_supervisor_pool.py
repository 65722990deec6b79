"""The supervisor's parts without a gateway or a model: the process pool stops workers
without waiting, the router keys everything by request, and a cache clear spares the
folders of running workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlxtg.models import demo_spec
from mlxtg.protocol import Control, Delta, Generate
from mlxtg.supervisor import control
from mlxtg.supervisor.config import ServerSettings
from mlxtg.supervisor.pool import WorkerPool
from mlxtg.supervisor.processes import WorkerHandle, WorkerState
from mlxtg.supervisor.residency import SpareState
from mlxtg.supervisor.router import Router

# A child that ignores SIGTERM, and says so once it does (no race with the test's signal).
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(120)"
SLEEPER = "import time; print('ok', flush=True); time.sleep(120)"


def child(code: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        assert proc.stdout.readline() == b"ok\n"
    return proc


def handle(proc: subprocess.Popen[bytes], name: str = "a", **kw: Any) -> WorkerHandle:
    spec = demo_spec().model_copy(update={"model_name": name})
    return WorkerHandle(worker_id=f"{name}-w", spec=spec, proc=proc, **kw)


@pytest.fixture
def pool():
    p = WorkerPool("ipc:///nonexistent", fast_blas=False, grace=5.0)
    yield p
    p.close(timeout=5.0)


# --- pool ------------------------------------------------------------------------------------


def test_stop_returns_at_once_and_reap_collects_the_exited_process(pool: WorkerPool):
    h = handle(child(SLEEPER))
    pool.workers[h.worker_id] = h
    pool.stop(h, now=0.0)
    assert pool.workers == {} and h.state == WorkerState.STOPPED
    assert len(pool.exiting) == 1  # counted as holding memory until it has exited
    assert h.proc.wait(timeout=30) == -signal.SIGTERM
    pool.reap(now=0.1)
    assert pool.exiting == []


def test_a_process_ignoring_sigterm_is_killed_after_the_grace(pool: WorkerPool):
    h = handle(child(STUBBORN))
    pool.workers[h.worker_id] = h
    pool.stop(h, now=0.0)
    pool.reap(now=4.0)  # within the grace: left alone
    assert h.proc.poll() is None and len(pool.exiting) == 1
    pool.reap(now=5.0)
    assert h.proc.wait(timeout=30) == -signal.SIGKILL
    pool.reap(now=5.1)
    assert pool.exiting == []


def test_kill_is_immediate_and_a_process_that_never_exits_is_given_up(pool: WorkerPool):
    h = handle(child(STUBBORN))
    pool.workers[h.worker_id] = h
    pool.kill(h, now=0.0)
    assert h.proc.wait(timeout=30) == -signal.SIGKILL

    class Unkillable:  # stuck in the kernel: signals are delivered, it never exits
        pid = 999_999_999
        signals: list[int] = []

        def poll(self) -> None:
            return None

        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)

    stuck = handle(Unkillable(), name="b")  # type: ignore[arg-type]
    pool.workers[stuck.worker_id] = stuck
    pool.stop(stuck, now=0.0)
    pool.reap(now=5.0)
    assert Unkillable.signals == [signal.SIGTERM, signal.SIGKILL]
    pool.reap(now=9.0)
    assert len(pool.exiting) == 1
    pool.reap(now=10.0)  # SIGKILL plus a grace: no longer holds loads back
    assert pool.exiting == []


def test_died_lists_workers_that_exited_unasked_and_close_ends_everything(pool: WorkerPool):
    quick = handle(subprocess.Popen([sys.executable, "-c", "pass"]), name="q")
    stubborn = handle(child(STUBBORN), name="s")
    pool.workers = {quick.worker_id: quick, stubborn.worker_id: stubborn}
    quick.proc.wait(timeout=30)
    assert pool.died() == [quick]
    assert pool.spare_state() == SpareState.NONE
    pool.close(timeout=0.2)
    assert stubborn.proc.poll() == -signal.SIGKILL
    assert pool.workers == {}


# --- router ----------------------------------------------------------------------------------


def gen(rid: str, n: int = 1) -> Generate:
    return Generate(request_id=rid, model="a", params={}, n=n)


def test_output_is_split_per_gateway_and_routes_end_with_their_last_choice():
    r = Router(max_queued=4)
    r.add(b"g1", "w", gen("x", n=2))
    r.add(b"g2", "w", gen("y"))
    per, done = r.split(
        [Delta("x", 0, "a"), Delta("y", 0, "b", finish_reason="stop"), Delta("z", 0, "?")]
    )
    assert {g: [d.request_id for d in ds] for g, ds in per.items()} == {
        b"g1": ["x"],
        b"g2": ["y"],
    }
    assert done == ["y"]
    per, done = r.split([Delta("x", 0, finish_reason="stop")])
    assert done == []  # one of two choices
    per, done = r.split([Delta("x", 1, finish_reason="abort")])
    assert done == ["x"]
    for rid in ("x", "y"):
        assert r.finish(rid) is not None
    assert r.inflight("w") == 0 and r.routes == {}


def test_a_dead_workers_routes_are_handed_back_to_fail():
    r = Router(max_queued=4)
    r.add(b"g1", "w1", gen("x"))
    r.add(b"g2", "w2", gen("y"))
    assert r.inflight("w1") == 1
    dropped = r.drop_worker("w1")
    assert [(rid, route.gateway) for rid, route in dropped] == [("x", b"g1")]
    assert r.inflight("w1") == 0 and list(r.routes) == ["y"]


def test_waiting_requests_queue_per_model_bounded_and_expire():
    r = Router(max_queued=2)
    assert r.enqueue("a", b"g", gen("1"), now=0.0)
    assert r.enqueue("a", b"g", gen("2"), now=5.0)
    assert not r.enqueue("a", b"g", gen("3"), now=5.0)  # full: the caller answers 429
    assert r.enqueue("b", b"g", gen("4"), now=5.0)
    assert r.waiting_models() == ("a", "b")
    assert r.cancel("4") and r.waiting_models() == ("a",)
    expired = r.expired(now=8.0, timeout=4.0)
    assert [(m, w.msg.request_id) for m, w in expired] == [("a", "1")]
    assert [w.msg.request_id for w in r.take("a")] == ["2"]
    assert r.waiting("a") == 0


# --- supervisor: cache clear and non-blocking evict -----------------------------------------


@pytest.fixture
def sup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlxtg.supervisor.core import Supervisor

    monkeypatch.setenv("MLXTG_HOME", str(tmp_path / "home"))
    s = Supervisor(ServerSettings(models=[demo_spec()], standby_worker=False))
    yield s
    s.close()


def test_cache_clear_spares_a_running_workers_folder(sup, tmp_path: Path):
    name = demo_spec().name
    root = tmp_path / "home" / "kv-cache"
    for fp in ("fp-running", "fp-old"):
        (root / fp / "ab").mkdir(parents=True)
        (root / fp / "meta.json").write_text(json.dumps({"model": name, "fingerprint": fp}))
        (root / fp / "ab" / "block.safetensors").write_bytes(b"x")
    h = handle(child(SLEEPER), name=name, state=WorkerState.READY)
    h.facts["fingerprint"] = "fp-running"
    sup.pool.workers[h.worker_id] = h
    reply = control.answer(sup, Control(request_id="r", op="cache_clear", args={"model": name}))
    assert reply.ok
    # The running worker got the CACHE_CLEAR and empties its own folder; its meta stays.
    assert (root / "fp-running" / "meta.json").exists()
    assert not (root / "fp-old").exists()
    assert sorted(reply.data["removed"]) == [f"{name} (fp-old)", f"{name} (fp-running)"]


def test_evicting_a_worker_that_ignores_sigterm_does_not_wait_for_it(sup):
    h = handle(child(STUBBORN), name=demo_spec().name, state=WorkerState.READY)
    sup.pool.workers[h.worker_id] = h
    reply = control.answer(sup, Control(request_id="r", op="evict", args={}))
    assert reply.data["models"] == {h.name: "evicted"}
    assert h.proc.poll() is None  # still running: the supervisor went on
    assert control.status(sup)["models"][0]["state"] == "unloaded"
    assert sup.counters["evictions"] == 1
    sup.pool.close(timeout=0.2)  # shutdown may wait: SIGKILL after the grace
    assert h.proc.poll() == -signal.SIGKILL
