import pytest

from mlxtg.worker.scheduler import QueueFull, Request, Scheduler


def req(rid, n_tokens, n=1, max_tokens=1):
    return Request(request_id=rid, prompt=list(range(n_tokens)), n=n, max_tokens=max_tokens)


def run_plan(s, plan):
    """What the engine does with a plan: complete chunks, start the planned choices."""
    for more in plan.slices:
        s.start(more.request, more.choices)
        s.join([more.request.request_id] * more.choices)
    for chunk in plan.prefill:
        pending = chunk.request.pending
        s.complete(chunk)
        if chunk.is_last:
            s.join([chunk.request.request_id] * (chunk.choices or pending))


def running(s, count):
    s.running = [f"seq{i}" for i in range(count)]


def test_long_prompt_is_chunked_and_never_blocks_decode():
    s = Scheduler(max_batch=8, max_queued=8, chunk_tokens=512)
    running(s, 3)
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
    running(s, 1)
    for i in range(14):
        s.add(req(f"r{i}", 40))
    plan = s.schedule()
    # One padded batch: 12 rows x 40 tokens fit 512, a 13th would not.
    assert [c.request.request_id for c in plan.final] == [f"r{i}" for i in range(12)]
    assert plan.partial is None and all(c.is_last for c in plan.final)


def test_padded_cost_counts_the_longest_rest():
    s = Scheduler(max_batch=32, max_queued=64, chunk_tokens=512)
    running(s, 1)
    s.add(req("short", 10))
    s.add(req("long", 300))
    plan = s.schedule()
    assert [c.request.request_id for c in plan.final] == ["short"]  # 2 x 300 > 512
    unpadded = Scheduler(max_batch=32, max_queued=64, chunk_tokens=512, padded=False)
    running(unpadded, 1)
    unpadded.add(req("short", 10))
    unpadded.add(req("long", 300))
    assert len(unpadded.schedule().final) == 2


def test_nothing_running_gets_the_idle_budget():
    s = Scheduler(max_batch=32, max_queued=64, chunk_tokens=512, idle_chunk_tokens=2048)
    for i in range(16):
        s.add(req(f"r{i}", 100))
    assert len(s.schedule().final) == 16  # arrivals that came together start together
    running(s, 16)
    assert len(s.schedule().final) == 5  # one waiting per running stream: chunk_tokens


def started(plan):
    return [c.request.request_id for c in plan.prefill]


def test_a_request_that_does_not_fit_lets_later_ones_take_the_free_rows():
    s = Scheduler(max_batch=4, max_queued=64, chunk_tokens=4096)
    running(s, 3)
    s.add(req("a", 10, n=2))
    s.add(req("b", 10, n=1))
    plan = s.schedule()
    assert started(plan) == ["b"]  # "a" needs 2 rows, only 1 is free
    assert s.waiting[0].overtaken == 1
    run_plan(s, plan)
    running(s, 2)
    assert started(s.schedule()) == ["a"]


def test_the_least_work_starts_first():
    s = Scheduler(max_batch=8, max_queued=64, chunk_tokens=4096)
    running(s, 1)
    s.add(req("big", 10, n=4, max_tokens=300))
    s.add(req("long", 10, max_tokens=1000))
    s.add(req("short", 10, max_tokens=8))
    s.add(req("also-short", 10, max_tokens=8))
    assert [r.request_id for r in s.order()] == ["short", "also-short", "long", "big"]
    assert started(s.schedule()) == ["short", "also-short", "long", "big"]  # all fit
    running(s, 5)
    for r in list(s.waiting):
        s.remove(r.request_id)
    s.add(req("big", 10, n=4, max_tokens=300))
    s.add(req("short", 10, max_tokens=8))
    # 3 free rows: the short one starts, the big one waits for 4.
    assert started(s.schedule()) == ["short"]


def test_an_overtaken_request_holds_the_line_and_takes_the_rows_that_free():
    s = Scheduler(max_batch=4, max_queued=64, chunk_tokens=4096, max_overtakes=2)
    running(s, 3)
    s.add(req("big", 10, n=2, max_tokens=100))
    for i in range(2):  # a stream of short requests, each taking the one free row
        s.add(req(f"short{i}", 10, max_tokens=8))
        plan = s.schedule()
        assert started(plan) == [f"short{i}"]
        run_plan(s, plan)
        s.running.pop()  # ... and finishing
    assert s.waiting[0].overtaken == 2 and s.holds_line(s.waiting[0])
    s.add(req("short2", 10, max_tokens=8))
    plan = s.schedule()
    # big's turn: its prompt is prefilled and one choice takes the one free row.
    assert started(plan) == ["big"] and plan.final[0].choices == 1
    run_plan(s, plan)
    big = s.waiting[0]
    assert big.request_id == "big" and big.pending == 1 and big.overtaken == 0
    assert s.schedule().empty is False and not s.schedule().slices  # no row free
    s.running.pop()
    plan = s.schedule()  # one row: short2 is less work than big's other choice
    assert started(plan) == ["short2"] and not plan.slices
    run_plan(s, plan)
    s.running.pop()
    plan = s.schedule()
    assert [(m.request.request_id, m.choices) for m in plan.slices] == [("big", 1)]
    run_plan(s, plan)
    assert not s.waiting


def test_a_request_bigger_than_the_batch_starts_in_slices_and_leaves_rows_to_others():
    s = Scheduler(max_batch=4, max_queued=64, chunk_tokens=4096)
    s.add(req("huge", 10, n=10, max_tokens=1000))
    plan = s.schedule()
    assert started(plan) == ["huge"] and plan.final[0].choices == 4  # every free row
    run_plan(s, plan)
    assert s.waiting[0].pending == 6 and s.waiting[0].remaining == 0
    s.add(req("short", 10, max_tokens=8))
    plan = s.schedule()
    assert plan.empty is False and not plan.prefill and not plan.slices  # no row is free
    s.running.pop()  # one of huge's choices ends: the short request gets its row
    plan = s.schedule()
    assert started(plan) == ["short"] and not plan.slices
    run_plan(s, plan)
    s.running = s.running[:2]  # two rows free: huge's next slice, nothing to prefill
    plan = s.schedule()
    assert [(m.request.request_id, m.choices) for m in plan.slices] == [("huge", 2)]
    assert not plan.prefill
    run_plan(s, plan)
    s.running = []
    plan = s.schedule()
    assert [(m.request.request_id, m.choices) for m in plan.slices] == [("huge", 4)]
    run_plan(s, plan)
    assert not s.waiting and len(s.running) == 4


def test_a_request_bigger_than_the_batch_is_not_starved():
    s = Scheduler(max_batch=4, max_queued=64, chunk_tokens=4096, max_overtakes=3)
    running(s, 4)
    s.add(req("huge", 10, n=6, max_tokens=100))
    for i in range(3):
        s.running.pop(0)
        s.add(req(f"short{i}", 10, max_tokens=8))
        plan = s.schedule()
        assert started(plan) == [f"short{i}"]  # less work than "huge"
        run_plan(s, plan)
    s.add(req("late", 10, max_tokens=8))
    s.running.pop(0)
    plan = s.schedule()
    assert started(plan) == ["huge"]  # "huge" holds the line: it takes the free row
    run_plan(s, plan)
    assert s.waiting[0].request_id == "huge" and s.waiting[0].pending == 5


def test_a_prompt_being_chunked_is_finished_before_new_work_starts():
    s = Scheduler(max_batch=8, max_queued=8, chunk_tokens=512)
    running(s, 1)
    s.add(req("long", 1500, max_tokens=500))
    plan = s.schedule()
    assert plan.partial is not None and plan.partial.request.request_id == "long"
    run_plan(s, plan)
    s.add(req("short", 10, max_tokens=4))  # less work, but "long" holds a half-built cache
    plan = s.schedule()
    assert plan.partial is not None and plan.partial.request.request_id == "long"
    run_plan(s, plan)
    plan = s.schedule()
    assert started(plan) == ["long"] and plan.final[0].is_last
    run_plan(s, plan)
    assert started(s.schedule()) == ["short"]


def test_request_larger_than_batch_starts_with_every_row():
    s = Scheduler(max_batch=4, max_queued=4, chunk_tokens=100)
    s.add(req("big", 10, n=6))
    plan = s.schedule()
    assert [(c.request.request_id, c.choices) for c in plan.prefill] == [("big", 4)]


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


def test_a_burst_behind_one_early_starter_prefills_together():
    s = Scheduler(max_batch=32, max_queued=64, chunk_tokens=512, idle_chunk_tokens=2048)
    running(s, 1)
    for i in range(15):
        s.add(req(f"r{i}", 51))
    assert len(s.schedule().final) == 15  # 15 waiting per running stream: the idle budget
    lone = Scheduler(max_batch=32, max_queued=64, chunk_tokens=512, idle_chunk_tokens=2048)
    running(lone, 1)
    lone.add(req("long", 4000))
    plan = lone.schedule()
    assert plan.partial is not None and plan.partial.size == 512  # still chunked


def test_a_boundary_ends_a_chunk_of_its_own():
    s = Scheduler(max_batch=8, max_queued=8, chunk_tokens=512)
    r = req("tail", 30)
    r.boundary = 26
    s.add(r)
    s.add(req("other", 5))
    plan = s.schedule()
    assert plan.partial is not None and (plan.partial.start, plan.partial.end) == (0, 26)
    assert not plan.final  # the boundary chunk runs alone
    run_plan(s, plan)
    plan = s.schedule()
    assert [(c.request.request_id, c.start, c.end) for c in plan.final] == [
        ("tail", 26, 30),
        ("other", 0, 5),
    ]
