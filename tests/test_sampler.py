"""The sampler on hand-made logits: tiny temperatures and penalties never produce NaN."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxtg.worker.params import SamplingParams
from mlxtg.worker.sampler import RowState, sample


def rows(vocab: int, prompt: tuple[int, ...] = (1, 2, 3), **params) -> list[RowState]:
    return [RowState.create(SamplingParams(max_tokens=4, **params), vocab, list(prompt))]


def test_a_tiny_temperature_is_the_argmax():
    logits = mx.array(np.linspace(-20, 20, 50, dtype=np.float32)[None])
    assert sample(logits, rows(50, temperature=1e-38, seed=1)).tokens == [49]
    assert sample(logits, rows(50, temperature=1e-38, top_p=0.5, seed=1)).tokens == [49]


def test_a_tiny_repetition_penalty_stays_finite():
    logits = mx.array(np.linspace(-20, 20, 50, dtype=np.float32)[None])
    # Token 45 was seen and has a positive logit: a penalty below 1 boosts it (x / penalty).
    got = sample(logits, rows(50, (45,), temperature=0.7, repetition_penalty=1e-45, seed=3))
    assert got.tokens == [45]  # overflowing to inf would make the softmax NaN: token 0
