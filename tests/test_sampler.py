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


def test_logit_bias_lands_on_its_token_ids():
    import numpy as np

    from mlxtg.worker.params import SamplingParams
    from mlxtg.worker.sampler import RowState

    params = SamplingParams(max_tokens=4, logit_bias={3: 5.0, 7: -100.0, 0: 1.5})
    row = RowState.create(params, vocab_size=10, prompt=[1, 2])
    bias = np.array(row.bias)
    assert bias[3] == 5.0 and bias[7] == -100.0 and bias[0] == 1.5
    assert np.count_nonzero(bias) == 3


def test_a_huge_logit_bias_map_is_refused_before_its_entries_are_converted():
    import pytest
    from pydantic import ValidationError

    from mlxtg.gateway.schemas import MAX_LOGIT_BIAS, ChatCompletionRequest

    huge = {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}
    with pytest.raises(ValidationError, match="logit_bias has"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": huge}
        )
