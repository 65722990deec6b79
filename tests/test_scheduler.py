import pytest

from mlxtg.worker.scheduler import QueueFull, Request, Scheduler


def req(rid, n_tokens, n=1):
    return Request(request_id=rid, prompt=list(range(n_tokens)), n=n)


def run_plan(s, plan):
    for chunk in plan.prefill:
        s.complete(chunk)
        if chunk.is_last:
            s.num_running += chunk.request.n


def test_long_prompt_is_chunked_and_never_blocks_decode():
    s = Scheduler(max_batch=8, max_queued=8, chunk_tokens=512)
    s.num_running = 3
    s.add(req("long", 4096))
    steps = 0
    while s.waiting:
        plan = s.schedule()
        assert plan.decode  # running streams advance every step
        assert sum(c.end - c.start for c in plan.prefill) <= 512
        run_plan(s, plan)
        steps += 1
    assert steps == 8


def test_short_prompts_share_one_step_within_budget():
    s = Scheduler(max_batch=32, max_queued=64, chunk_tokens=512)
    for i in range(10):
        s.add(req(f"r{i}", 40))
    plan = s.schedule()
    assert [c.request.request_id for c in plan.prefill] == [f"r{i}" for i in range(10)]
    assert all(c.is_last for c in plan.prefill)


def test_batch_limit_holds_requests_back_in_order():
    s = Scheduler(max_batch=4, max_queued=64, chunk_tokens=4096)
    s.num_running = 3
    s.add(req("a", 10, n=2))
    s.add(req("b", 10, n=1))
    plan = s.schedule()
    assert plan.prefill == []  # "a" needs 2 slots, only 1 free: FIFO, b waits too
    s.num_running = 2
    plan = s.schedule()
    assert [c.request.request_id for c in plan.prefill] == ["a"]


def test_request_larger_than_batch_runs_alone():
    s = Scheduler(max_batch=4, max_queued=4, chunk_tokens=100)
    s.add(req("big", 10, n=6))
    assert [c.request.request_id for c in s.schedule().prefill] == ["big"]


def test_queue_bound_and_abort():
    s = Scheduler(max_batch=4, max_queued=2, chunk_tokens=100)
    s.add(req("a", 5))
    s.add(req("b", 5))
    with pytest.raises(QueueFull):
        s.add(req("c", 5))
    assert s.remove("a") is not None
    assert s.remove("a") is None  # idempotent
    s.add(req("c", 5))
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_cached_prefix_only_prefills_the_rest():
    s = Scheduler(max_batch=4, max_queued=4, chunk_tokens=512)
    r = req("cached", 1000)
    r.num_computed = 900
    s.add(r)
    plan = s.schedule()
    assert [(c.start, c.end) for c in plan.prefill] == [(900, 1000)]


def test_idle():
    s = Scheduler()
    assert s.idle
    s.add(req("a", 3))
    assert not s.idle
