"""Prompt logprobs: how likely the model found each prompt token (completions `echo` with
`logprobs`, what lm-eval-harness log-likelihood tasks send).

A prefill forward pass yields logits at every position; position t scores token t + 1.
A prompt prefilled in chunks is scored chunk by chunk (`score`), so only one chunk's
logits are ever held; `entries` turns the scores into one entry per prompt token, the
first of which has no logprob.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..protocol import LogprobEntry
from .text import TokenBytes


@dataclass(slots=True)
class ChunkScores:
    """Scores of consecutive prompt tokens: `chosen[i]` is the logprob of the token it
    scores, `top_ids[i]` / `top_lp[i]` its best `k` alternatives, best first."""

    chosen: np.ndarray  # (L,) float32
    top_ids: np.ndarray  # (L, k) int
    top_lp: np.ndarray  # (L, k) float32


def score(logits: mx.array, targets: list[int], k: int) -> tuple[mx.array, ...]:
    """Lazy scores of `targets` under `logits` (L, V), row t scoring targets[t]; rows past
    the targets (the last position of a prompt, which predicts the reply) are ignored."""
    n = len(targets)
    if n == 0:
        empty = mx.zeros((0,), dtype=mx.float32)
        return empty, mx.zeros((0, k), dtype=mx.int32), mx.zeros((0, k), dtype=mx.float32)
    logits = logits[:n].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, mx.array(targets)[:, None], axis=-1)[:, 0]
    if k == 0:
        return chosen, mx.zeros((n, 0), dtype=mx.int32), mx.zeros((n, 0), dtype=mx.float32)
    top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    top_lp = mx.take_along_axis(logprobs, top_ids, axis=-1)
    order = mx.argsort(-top_lp, axis=-1)
    return (
        chosen,
        mx.take_along_axis(top_ids, order, axis=-1),
        mx.take_along_axis(top_lp, order, axis=-1),
    )


def to_numpy(scores: tuple[mx.array, ...]) -> ChunkScores:
    chosen, top_ids, top_lp = (np.array(a) for a in scores)
    return ChunkScores(chosen, top_ids, top_lp)


def entries(
    token_bytes: TokenBytes, prompt: list[int], chunks: list[ChunkScores]
) -> list[LogprobEntry]:
    """One entry per prompt token: the first has no logprob, the others their scores."""
    text, raw = token_bytes(prompt[0])
    out = [LogprobEntry(token=text, logprob=None, bytes=raw)]
    position = 1
    for chunk in chunks:
        for i in range(len(chunk.chosen)):
            text, raw = token_bytes(prompt[position])
            top = []
            for tid, lp in zip(chunk.top_ids[i].tolist(), chunk.top_lp[i].tolist(), strict=True):
                t, b = token_bytes(tid)
                top.append((t, lp, b))
            out.append(LogprobEntry(token=text, logprob=float(chunk.chosen[i]), bytes=raw, top=top))
            position += 1
    if position != len(prompt):
        raise RuntimeError(f"scored {position} of {len(prompt)} prompt tokens")
    return out
