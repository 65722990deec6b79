"""Prompt logprobs (completions `echo` + `logprobs`) from `Engine.step`, checked against
mlx-lm's model run in process on the same tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_model import build_model

from mlxtg.models import ModelSpec
from mlxtg.protocol import Accepted, Generate, Output
from mlxtg.worker.engine import Engine
from mlxtg.worker.loader import load
from mlxtg.worker.params import SamplingParams
from mlxtg.worker.prefix_cache import RamPrefixCache
from mlxtg.worker.preprocess import Preprocessor
from mlxtg.worker.prompt_cache import PromptCache
from mlxtg.worker.scheduler import Scheduler

PROMPT = [(i * 37 + 11) % 1000 for i in range(150)]  # 150 tokens: three 64-token chunks


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(ModelSpec(model_id_or_path=str(build_model(tmp_path_factory.mktemp("m") / "m"))))


def reference(loaded, tokens: list[int]) -> np.ndarray:
    """log-softmax at every position, prefilled in one piece."""
    logits = loaded.model(mx.array(tokens)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def run(loaded, gens: list[Generate], busy: bool = False):
    eng = Engine(
        loaded,
        PromptCache(RamPrefixCache(1 << 30, min_tokens=4)),
        scheduler=Scheduler(max_batch=32, max_queued=64, chunk_tokens=64),
    )
    pre = Preprocessor(loaded)
    inputs = [pre(g) for g in gens]
    if busy:  # other streams decoding around the scored prompt
        p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        inputs += [
            pre(Generate(request_id=f"other{i}", model="m", params=p, prompt=f"busy {i}"))
            for i in range(3)
        ]
    accepted, deltas = {}, {}
    messages = eng.step(inputs)
    for _ in range(200):
        for m in messages:
            if isinstance(m, Accepted):
                accepted[m.request_id] = m
            elif isinstance(m, Output):
                for d in m.deltas:
                    deltas.setdefault((d.request_id, d.index), []).append(d)
        if eng.idle:
            return accepted, deltas
        messages = eng.step()
    raise AssertionError("the engine did not go idle")


def scored(rid: str, prompt, k: int = 3, max_tokens: int = 1, n: int = 1, **kw) -> Generate:
    p = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, logprobs=True, top_logprobs=k, prompt_logprobs=k
    )
    return Generate(
        request_id=rid,
        model="m",
        params=p,
        n=n,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=prompt if isinstance(prompt, list) else None,
        **kw,
    )


@pytest.mark.parametrize("busy", [False, True])
def test_chunked_prompt_scores_match_mlx_lm(loaded, busy):
    _, deltas = run(loaded, [scored("s", PROMPT)], busy=busy)
    entries = deltas[("s", 0)][0].prompt_logprobs
    assert entries is not None and len(entries) == len(PROMPT)
    assert entries[0].logprob is None and entries[0].top == []
    ref = reference(loaded, PROMPT)
    got = np.array([e.logprob for e in entries[1:]])
    want = ref[np.arange(len(PROMPT) - 1), PROMPT[1:]]
    assert np.abs(got - want).max() <= 1e-4
    for t, e in enumerate(entries[1:]):
        best = np.sort(ref[t])[::-1][:3]
        assert np.abs(np.array([lp for _, lp, _ in e.top]) - best).max() <= 1e-4
    # One generated token follows, with its own entry (log-likelihood clients count on it).
    assert sum(len(d.logprobs or []) for d in deltas[("s", 0)]) == 1


def test_max_tokens_zero_scores_and_generates_nothing(loaded):
    accepted, deltas = run(loaded, [scored("z", PROMPT[:20], max_tokens=0, n=2, echo=True)])
    assert accepted["z"].prompt_text == loaded.tokenizer.decode(PROMPT[:20])
    for i in range(2):
        (only,) = deltas[("z", i)]
        assert only.finish_reason == "length" and only.token_ids == []
        assert only.prompt_logprobs is not None and len(only.prompt_logprobs) == 20


def test_a_scored_prompt_skips_the_prefix_cache_and_text_prompts_work(loaded):
    eng_gens = [scored("t", "the quick brown fox jumps over the lazy dog", k=0)]
    accepted, deltas = run(loaded, eng_gens)
    assert accepted["t"].cached_tokens == 0
    assert accepted["t"].cache_miss_reason == "prompt_logprobs"
    entries = deltas[("t", 0)][0].prompt_logprobs
    assert entries is not None and all(e.top == [] for e in entries)
    tokens = Preprocessor(loaded)(eng_gens[0]).prompt
    want = reference(loaded, tokens)[np.arange(len(tokens) - 1), tokens[1:]]
    assert np.abs(np.array([e.logprob for e in entries[1:]]) - want).max() <= 1e-4
