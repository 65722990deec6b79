"""`Engine.step` driven directly, without sockets: admit, prefill, join, finish, abort."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_model import build_model

from mlxtg.models import ModelSpec
from mlxtg.protocol import Abort, Accepted, Error, ErrorKind, FinishReason, Generate, Output
from mlxtg.worker.engine import Engine
from mlxtg.worker.guided import GuidedError
from mlxtg.worker.loader import load
from mlxtg.worker.params import SamplingParams
from mlxtg.worker.prefix_cache import RamPrefixCache
from mlxtg.worker.preprocess import Preprocessor
from mlxtg.worker.prompt_cache import PromptCache
from mlxtg.worker.scheduler import Scheduler


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(ModelSpec(model_id_or_path=str(build_model(tmp_path_factory.mktemp("m") / "m"))))


def engine(loaded, batched=True, cache_bytes=1 << 30, overlap=None, **sched) -> Engine:
    kw = {"max_batch": 32, "max_queued": 64, "chunk_tokens": 64, **sched}
    return Engine(
        loaded,
        PromptCache(RamPrefixCache(cache_bytes, min_tokens=4)),
        scheduler=Scheduler(padded=batched, **kw),
        batched_prefill=batched,
        overlap=overlap,
    )


def request(loaded, rid, text, n=1, **params):
    p = SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **params})
    msg = Generate(
        request_id=rid,
        model="m",
        params=p,
        n=n,
        messages=[{"role": "user", "content": text}],
    )
    return Preprocessor(loaded)(msg)


class Log:
    """Everything the steps said, by request (and choice)."""

    def __init__(self):
        self.accepted: dict[str, Accepted] = {}
        self.tokens: dict[tuple[str, int], list[int]] = {}
        self.finish: dict[tuple[str, int], str] = {}
        self.errors: dict[str, Error] = {}
        self.logprobs: dict[tuple[str, int], int] = {}

    def take(self, messages):
        for m in messages:
            if isinstance(m, Accepted):
                self.accepted[m.request_id] = m
            elif isinstance(m, Error):
                self.errors[m.request_id] = m
            elif isinstance(m, Output):
                for d in m.deltas:
                    key = (d.request_id, d.index)
                    self.tokens.setdefault(key, []).extend(d.token_ids)
                    self.logprobs[key] = self.logprobs.get(key, 0) + len(d.logprobs or [])
                    if d.finish_reason:
                        self.finish[key] = d.finish_reason
        return self


def drain(eng: Engine, log: Log, limit: int = 500) -> Log:
    for _ in range(limit):
        if eng.idle:
            return log
        log.take(eng.step())
    raise AssertionError("the engine did not go idle")


def test_admit_prefill_decode_finish(loaded):
    eng = engine(loaded)
    log = Log().take(eng.step([request(loaded, "a", "hello there")]))
    assert log.accepted["a"].prompt_tokens > 0
    assert len(log.tokens[("a", 0)]) == 1  # the first token comes from the prefill step
    eng.publish(force=True)  # published at most every 0.2 s while busy
    assert eng.snapshot["running"] == 1 and eng.scheduler.num_running == 1
    drain(eng, log)
    assert len(log.tokens[("a", 0)]) == 8 and log.finish[("a", 0)] == "length"
    assert eng.runner.cache is None and eng.runner.pending is None
    assert eng.snapshot["running"] == 0 and eng.snapshot["tokens_generated"] == 8


def test_join_mid_decode_keeps_greedy_output(loaded):
    alone = drain(eng := engine(loaded), Log().take(eng.step([request(loaded, "b", "late one")])))
    eng = engine(loaded)
    log = Log().take(eng.step([request(loaded, "a", "first one", max_tokens=12)]))
    for _ in range(3):
        log.take(eng.step())
    log.take(eng.step([request(loaded, "b", "late one")]))  # joins a running batch
    drain(eng, log)
    assert log.tokens[("b", 0)] == alone.tokens[("b", 0)]
    assert len(log.tokens[("a", 0)]) == 12


@pytest.mark.parametrize("batched", [True, False])
def test_arrivals_prefill_together_and_match_alone(loaded, batched):
    texts = [f"prompt {i} " + "fox " * (i * 3) for i in range(6)]
    ref = {}
    for i, t in enumerate(texts):
        solo = engine(loaded, batched=False)
        ref[i] = drain(solo, Log().take(solo.step([request(loaded, str(i), t)]))).tokens[
            (str(i), 0)
        ]
    eng = engine(loaded, batched=batched, chunk_tokens=4096)
    log = Log().take(eng.step([request(loaded, str(i), t) for i, t in enumerate(texts)]))
    assert all(len(log.tokens[(str(i), 0)]) == 1 for i in range(6))  # one prefill step for all
    drain(eng, log)
    assert {i: log.tokens[(str(i), 0)] for i in range(6)} == ref


def test_batched_prefill_mixes_cached_prefixes_and_fresh_prompts(loaded):
    base = "a long shared system prompt about the weather in oslo " * 3
    eng = engine(loaded, chunk_tokens=4096)
    drain(eng, Log().take(eng.step([request(loaded, "warm", base)])))
    reqs = [request(loaded, "hit", base), request(loaded, "cold", "something else")]
    log = drain(eng, Log().take(eng.step(reqs)))
    assert log.accepted["hit"].cached_tokens > 0 and log.accepted["hit"].cache_source == "ram"
    # Only the template's opening is shared: the rows start from prefixes of different lengths.
    assert log.accepted["cold"].cached_tokens < log.accepted["hit"].cached_tokens
    for rid, text in (("hit", base), ("cold", "something else")):
        solo = engine(loaded, batched=False, cache_bytes=0)
        expected = drain(solo, Log().take(solo.step([request(loaded, rid, text)])))
        assert log.tokens[(rid, 0)] == expected.tokens[(rid, 0)]


def test_n_choices_and_seeds_are_batch_independent(loaded):
    params = {"temperature": 1.0, "seed": 7, "max_tokens": 10}
    solo = engine(loaded)
    alone = drain(solo, Log().take(solo.step([request(loaded, "s", "seeded", n=3, **params)])))
    eng = engine(loaded, chunk_tokens=4096)
    crowd = [request(loaded, f"o{i}", f"other {i}", temperature=1.0) for i in range(4)]
    log = drain(
        eng,
        Log().take(
            eng.step([*crowd[:2], request(loaded, "s", "seeded", n=3, **params), *crowd[2:]])
        ),
    )
    for j in range(3):
        assert log.tokens[("s", j)] == alone.tokens[("s", j)]
    assert len({tuple(log.tokens[("s", j)]) for j in range(3)}) > 1  # the choices differ


def test_abort_running_and_waiting(loaded):
    eng = engine(loaded, chunk_tokens=16)
    log = Log().take(
        eng.step(
            [
                request(loaded, "a", "keep going", max_tokens=20),
                request(loaded, "b", "stop me", max_tokens=20),
            ]
        )
    )
    log.take(eng.step([request(loaded, "c", "long " * 60)]))  # prefilled in 16-token chunks
    assert any(r.request_id == "c" for r in eng.scheduler.waiting)
    log.take(eng.step([Abort(request_id="b"), Abort(request_id="c"), Abort(request_id="zz")]))
    assert log.finish[("b", 0)] == "abort" and log.finish[("c", 0)] == "abort"
    assert not eng.scheduler.waiting
    drain(eng, log)
    assert len(log.tokens[("a", 0)]) == 20 and log.finish[("a", 0)] == "length"


def test_a_short_request_overtakes_one_whose_choices_do_not_fit(loaded):
    alone = engine(loaded)
    ref = drain(alone, Log().take(alone.step([request(loaded, "big", "tell a story", n=3)])))
    eng = engine(loaded, max_batch=4)
    log = Log().take(eng.step([request(loaded, "first", "hello", n=2, max_tokens=12)]))
    arrivals = [
        request(loaded, "big", "tell a story", n=3),
        request(loaded, "small", "hi", max_tokens=4),
    ]
    first_token: dict[str, int] = {}
    finished: dict[tuple[str, int], int] = {}  # the step each choice finished in
    for step in range(200):
        before = {k: len(v) for k, v in log.tokens.items()}
        log.take(eng.step(arrivals if step == 0 else []))
        for key, toks in log.tokens.items():
            if toks and not before.get(key):
                first_token.setdefault(key[0], step)
        for key in log.finish:
            finished.setdefault(key, step)
        if eng.idle:
            break
    done = {rid: max(s for (r, _), s in finished.items() if r == rid) for rid, _ in finished}
    # "big" needs 3 rows while "first" holds 2 of 4: "small" takes a free row and is done
    # before "big" starts, which then runs as it would alone.
    assert first_token["small"] == 0 and done["small"] < first_token["big"]
    assert done["first"] <= first_token["big"]  # its rows free up in the decode part
    assert all(log.tokens[("big", j)] == ref.tokens[("big", j)] for j in range(3))


@pytest.mark.parametrize("seeded", [False, True])
def test_a_request_with_more_choices_than_rows_starts_in_slices(loaded, seeded):
    """n > max_batch: the prompt is prefilled once, choices start as rows free, a short
    request that arrives meanwhile gets a row before the big one's last choices, and every
    choice's tokens are those it has when all start together."""
    params = {"temperature": 1.0, "seed": 11} if seeded else {}
    wide = engine(loaded)
    ref = drain(wide, Log().take(wide.step([request(loaded, "big", "many", n=6, **params)])))
    eng = engine(loaded, max_batch=2, chunk_tokens=4096)
    log = Log().take(eng.step([request(loaded, "big", "many", n=6, **params)]))
    assert sorted(k for k in log.tokens if k[0] == "big") == [("big", 0), ("big", 1)]
    big = eng.scheduler.waiting[0]
    assert big.pending == 4 and big.remaining == 0 and big.first_logits is not None
    computed = eng.runner.prompt_tokens_computed
    log.take(eng.step([request(loaded, "small", "hi", max_tokens=3)]))
    first: dict[tuple[str, int], int] = {}
    for step in range(1, 200):
        before = set(log.tokens)
        log.take(eng.step())
        for key in set(log.tokens) - before:
            first[key] = step
        if eng.idle:
            break
    # big's prompt was prefilled once, not once per slice.
    small_prompt = log.accepted["small"].prompt_tokens
    assert eng.idle and eng.runner.prompt_tokens_computed == computed + small_prompt
    # The first rows to free go to "small" (less work) and to big's next slice together.
    assert first[("small", 0)] <= min(first[("big", j)] for j in range(2, 6))
    for j in range(6):
        assert log.tokens[("big", j)] == ref.tokens[("big", j)], j
        assert log.finish[("big", j)] == "length"
    assert not eng.scheduler.waiting and big.cache is None and big.first_logits is None


def test_a_slice_started_from_a_batched_prefill_matches(loaded):
    """A sliced request prefilled in a padded batch keeps its own row of the batch cache."""
    wide = engine(loaded)
    ref = drain(
        wide,
        Log().take(
            wide.step([request(loaded, "a", "one"), request(loaded, "big", "a longer one", n=3)])
        ),
    )
    eng = engine(loaded, max_batch=2, chunk_tokens=4096)
    log = Log().take(
        eng.step([request(loaded, "a", "one"), request(loaded, "big", "a longer one", n=3)])
    )
    assert set(log.tokens) == {("a", 0), ("big", 0)}  # one padded prefill, one row each
    drain(eng, log)
    assert log.tokens == ref.tokens


def test_aborting_a_request_with_choices_still_waiting(loaded):
    eng = engine(loaded, max_batch=2, chunk_tokens=4096)
    log = Log().take(eng.step([request(loaded, "big", "many", n=5, max_tokens=20)]))
    log.take(eng.step([Abort(request_id="big")]))
    assert log.finish[("big", 0)] == "abort" and log.finish[("big", 1)] == "abort"
    assert not eng.scheduler.waiting and eng.idle
    log.take(eng.step([request(loaded, "next", "after")]))
    drain(eng, log)
    assert len(log.tokens[("next", 0)]) == 8


def test_logprobs_and_stop_in_the_pipelined_step(loaded):
    eng = engine(loaded)
    log = drain(
        eng, Log().take(eng.step([request(loaded, "l", "hi", logprobs=True, top_logprobs=2)]))
    )
    assert log.logprobs[("l", 0)] == len(log.tokens[("l", 0)]) == 8


def test_full_queue_answers_429(loaded):
    eng = engine(loaded, max_queued=1, chunk_tokens=16)
    out = eng.step([request(loaded, "a", "x " * 50), request(loaded, "b", "y")])
    errors = [m for m in out if isinstance(m, Error)]
    assert [(e.request_id, e.kind) for e in errors] == [("b", ErrorKind.QUEUE_FULL)]


def test_a_failing_prefill_fails_only_its_request(loaded, monkeypatch):
    eng = engine(loaded)
    log = Log().take(eng.step([request(loaded, "ok", "fine", max_tokens=6)]))
    original = eng.runner.prefill_alone

    def broken(cache, tokens):
        raise RuntimeError("boom")

    monkeypatch.setattr(eng.runner, "prefill_alone", broken)
    log.take(eng.step([request(loaded, "bad", "breaks")]))
    monkeypatch.setattr(eng.runner, "prefill_alone", original)
    drain(eng, log)
    assert log.errors["bad"].kind == ErrorKind.INTERNAL and "boom" in log.errors["bad"].message
    assert len(log.tokens[("ok", 0)]) == 6


def test_pipelined_and_sequential_steps_agree(loaded):
    """The overlapped order (next forward queued before post-processing, as on a GPU) and
    the CPU order give the same tokens through joins, aborts, n > 1 and finishes."""

    def workload(overlap):
        eng = engine(loaded, overlap=overlap, chunk_tokens=32)
        log = Log().take(
            eng.step(
                [
                    request(loaded, "a", "one", max_tokens=14),
                    request(loaded, "b", "two", n=2, max_tokens=5),
                ]
            )
        )
        log.take(eng.step([request(loaded, "c", "three " * 12, max_tokens=9)]))
        log.take(eng.step())
        log.take(eng.step([Abort(request_id="a")]))
        log.take(eng.step([request(loaded, "d", "four", logprobs=True, max_tokens=7)]))
        return drain(eng, log)

    piped, plain = workload(True), workload(False)
    assert piped.tokens == plain.tokens and piped.finish == plain.finish
    assert piped.finish[("a", 0)] == "abort" and len(piped.tokens[("d", 0)]) == 7


def test_a_failing_forward_pass_fails_the_batch_and_the_engine_goes_on(loaded, monkeypatch):
    eng = engine(loaded)
    log = Log().take(eng.step([request(loaded, "x", "one", max_tokens=6)]))
    original = eng.runner.queue_decode

    def broken(inputs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(eng.runner, "queue_decode", broken)
    log.take(eng.step())
    assert log.errors["x"].kind == ErrorKind.INTERNAL and eng.idle
    monkeypatch.setattr(eng.runner, "queue_decode", original)
    drain(eng, log.take(eng.step([request(loaded, "y", "two", max_tokens=5)])))
    assert len(log.tokens[("y", 0)]) == 5 and log.finish[("y", 0)] == "length"


def test_a_constraint_failure_mid_stream_says_what_failed(loaded):
    class Guide:
        seen = 0

        def consume(self, token):
            self.seen += 1
            if self.seen == 3:
                raise GuidedError(f"token {token} violates the json constraint: nope", "x")

        def is_finished(self):
            return False

    class Guided:
        stats: dict[str, int] = {}

        def new_state(self, spec):
            return Guide()

        def batch_masks(self, guides):
            return np.ones((len(guides), loaded.vocab_size), dtype=bool)

    eng = engine(loaded)
    eng.guided = Guided()
    req = request(loaded, "g", "hi", max_tokens=6)
    req.payload.guide_spec = "a spec"
    deltas = []
    for _ in range(50):
        deltas += [
            d
            for m in eng.step([req] if not deltas else [])
            if isinstance(m, Output)
            for d in m.deltas
        ]
        if eng.idle and deltas:
            break
    last = deltas[-1]
    assert len(deltas) == 3 and last.finish_reason == FinishReason.ERROR
    assert last.error_kind == ErrorKind.GENERATION_FAILED
    assert (
        last.error_message is not None
        and "violates the json constraint: nope" in last.error_message
    )
    assert all(d.error_kind is None for d in deltas[:-1])
