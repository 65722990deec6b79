"""Batched sampling with per-row parameters.

One call handles a whole batch: logit bias, penalties and guided masks are applied as
(B, V) array operations, then greedy rows take the argmax and sampling rows draw by
inverse CDF with one uniform number per row. The uniform comes from the row's own numpy
generator, so a seeded request draws the same tokens alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .params import MIN_REPETITION_PENALTY, SamplingParams

if TYPE_CHECKING:
    from .guided import GuideState


@dataclass(slots=True)
class RowState:
    """What the sampler keeps for one sequence between steps."""

    params: SamplingParams
    rng: np.random.Generator
    vocab_size: int
    guide: GuideState | None = None
    bias: mx.array | None = None  # dense (V,) logit bias, built once
    counts: np.ndarray | None = None  # generated-token counts, only with penalties
    seen: np.ndarray | None = None  # prompt + generated tokens, for repetition_penalty
    banned: list[int] = field(default_factory=list)  # e.g. EOS under ignore_eos

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        vocab_size: int,
        prompt: list[int],
        seed_offset: int = 0,
        guide: GuideState | None = None,
        eos_ids: list[int] | None = None,
    ) -> RowState:
        seed = None if params.seed is None else params.seed + seed_offset
        row = cls(params=params, rng=np.random.default_rng(seed), vocab_size=vocab_size)
        row.guide = guide
        if params.logit_bias:
            # One vectorised write (a per-key loop ran for every choice of a big map).
            lb = params.logit_bias
            bias = np.zeros(vocab_size, dtype=np.float32)
            bias[np.fromiter(lb.keys(), np.int64, len(lb))] = np.fromiter(
                lb.values(), np.float32, len(lb)
            )
            row.bias = mx.array(bias)
        if params.needs_penalties:
            row.counts = np.zeros(vocab_size, dtype=np.float32)
            row.seen = np.zeros(vocab_size, dtype=bool)
            row.seen[np.asarray(prompt, dtype=np.int64)] = True
        if params.ignore_eos and eos_ids:
            row.banned = list(eos_ids)
        return row

    def record(self, token: int) -> None:
        """Account for a sampled token (penalty state)."""
        if self.counts is not None and self.seen is not None:
            self.counts[token] += 1
            self.seen[token] = True


@dataclass(slots=True)
class SampleResult:
    tokens: list[int]
    # (B, V) log-softmax of the raw model logits, for reporting; None when no row asked
    # (exp is slow on x86 CPUs: a softmax over the vocabulary is not free).
    logprobs: mx.array | None


@dataclass(slots=True)
class PendingSample:
    """A batch's sampled tokens, queued but not yet read back (see `sample_lazy`)."""

    chosen: mx.array  # (B,) token ids
    logprobs: mx.array | None
    rows: list[RowState]

    def result(self) -> SampleResult:
        """Wait for the tokens and account for them in each row's penalty state."""
        tokens = [int(t) for t in np.array(self.chosen)]
        for r, t in zip(self.rows, tokens, strict=True):
            r.record(t)
        return SampleResult(tokens=tokens, logprobs=self.logprobs)


def sample(logits: mx.array, rows: list[RowState], masks: np.ndarray | None = None) -> SampleResult:
    """Sample one token per row of `logits` (B, V), synchronously."""
    pending = sample_lazy(logits, rows, masks)
    mx.eval(pending.chosen, *(() if pending.logprobs is None else (pending.logprobs,)))
    return pending.result()


def sample_lazy(
    logits: mx.array, rows: list[RowState], masks: np.ndarray | None = None
) -> PendingSample:
    """Build (without evaluating) the sampling of one token per row of `logits` (B, V).
    `masks` (B, V) bool, optional, marks the tokens guided decoding allows (rows without a
    guide are all True). The caller evaluates it, typically together with the next
    forward pass, and reads the tokens with `PendingSample.result()`."""
    logits = logits.astype(mx.float32)
    logprobs = None
    if any(r.params.logprobs for r in rows):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    x = logits
    vocab = x.shape[-1]

    # 1. Additive and multiplicative adjustments, only when some row asks for them.
    if any(r.bias is not None for r in rows):
        zeros = mx.zeros((vocab,), dtype=mx.float32)
        x = x + mx.stack([r.bias if r.bias is not None else zeros for r in rows])
    if any(r.counts is not None for r in rows):
        x = _apply_penalties(x, rows, vocab)
    if any(r.banned for r in rows):
        ban = np.zeros((len(rows), vocab), dtype=bool)
        for i, r in enumerate(rows):
            ban[i, r.banned] = True
        x = mx.where(mx.array(ban), -mx.inf, x)
    if masks is not None:
        x = mx.where(mx.array(masks[:, :vocab]), x, -mx.inf)

    # 2. Greedy rows: argmax. Sampling rows: temperature, filters, inverse CDF.
    greedy = np.array([r.params.greedy for r in rows])
    argmax = mx.argmax(x, axis=-1)
    if greedy.all():
        chosen = argmax
    else:
        temps = mx.array([1.0 if r.params.greedy else r.params.temperature for r in rows])
        scaled = x / temps[:, None]
        if any(r.params.needs_filtering for r in rows):
            scaled = _filter(scaled, rows)
        probs = mx.softmax(scaled, axis=-1)
        cdf = mx.cumsum(probs, axis=-1)
        u = mx.array([0.0 if r.params.greedy else r.rng.random() for r in rows], dtype=mx.float32)
        drawn = mx.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
        drawn = mx.minimum(drawn, vocab - 1)
        chosen = mx.where(mx.array(greedy), argmax, drawn)
    return PendingSample(chosen=chosen.astype(mx.int32), logprobs=logprobs, rows=list(rows))


def _apply_penalties(x: mx.array, rows: list[RowState], vocab: int) -> mx.array:
    """OpenAI presence/frequency penalties on generated tokens; repetition penalty
    (as in vLLM) on every token seen in the prompt or output."""
    counts = np.zeros((len(rows), vocab), dtype=np.float32)
    seen = np.zeros((len(rows), vocab), dtype=bool)
    presence = np.zeros((len(rows), 1), dtype=np.float32)
    frequency = np.zeros((len(rows), 1), dtype=np.float32)
    repetition = np.ones((len(rows), 1), dtype=np.float32)
    for i, r in enumerate(rows):
        if r.counts is None or r.seen is None:
            continue
        counts[i] = r.counts[:vocab]
        seen[i] = r.seen[:vocab]
        presence[i] = r.params.presence_penalty
        frequency[i] = r.params.frequency_penalty
        repetition[i] = max(r.params.repetition_penalty, MIN_REPETITION_PENALTY)
    c = mx.array(counts)
    x = x - mx.array(frequency) * c - mx.array(presence) * (c > 0)
    rep = mx.array(repetition)
    penalised = mx.where(x > 0, x / rep, x * rep)
    return mx.where(mx.array(seen), penalised, x)


def _filter(scaled: mx.array, rows: list[RowState]) -> mx.array:
    """top_k, top_p and min_p per row, as one threshold per row on the sorted logits."""
    vocab = scaled.shape[-1]
    top_k = mx.array([r.params.top_k if r.params.top_k > 0 else vocab for r in rows])
    top_p = mx.array([r.params.top_p for r in rows], dtype=mx.float32)
    min_p = mx.array([r.params.min_p for r in rows], dtype=mx.float32)
    order = mx.argsort(-scaled, axis=-1)
    sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
    sorted_probs = mx.softmax(sorted_logits, axis=-1)
    before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = before < top_p[:, None]
    keep = mx.logical_and(keep, mx.arange(vocab)[None, :] < top_k[:, None])
    keep = mx.logical_and(keep, sorted_probs >= min_p[:, None] * sorted_probs[:, :1])
    threshold = mx.min(mx.where(keep, sorted_logits, mx.inf), axis=-1)
    return mx.where(scaled >= threshold[:, None], scaled, -mx.inf)


def top_logprobs(logprobs: mx.array, row: int, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one row, most likely first."""
    lp = logprobs[row]
    k = min(k, lp.shape[-1])
    idx = mx.argpartition(-lp, kth=k - 1)[:k]
    vals = lp[idx]
    mx.eval(idx, vals)
    pairs = [(int(i), float(v)) for i, v in zip(np.array(idx), np.array(vals), strict=True)]
    pairs.sort(key=lambda p: -p[1])
    return pairs
