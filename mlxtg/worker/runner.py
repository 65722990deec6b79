"""The model runner: forward passes and the decode batch's KV cache. Knows no queues.

Rows of the batch cache are the scheduler's running sequences, in order. Decode is
pipelined: `queue_decode` builds and starts the next forward pass and returns at once; its
logits (`pending`) are read by the next step, so a step's post-processing (detokenising,
stop strings, tool-call parsers) overlaps the model. Rows that joined after the forward was
queued have no pending logits yet: they are always the last rows.

Prefill of prompts that finish in the same step runs as one batch: their batch-1 caches
(empty, or a cached prefix) are merged left-aligned to the right as mlx-lm's BatchKVCache
does, the rest of every prompt is right-padded into one (B, L) forward pass, and the cache
is then rolled so the padding sits on the left where the decode mask expects it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .prompt_scores import ChunkScores, score, to_numpy


class ModelRunner:
    """Owns the model's tensors: the batch cache and the in-flight decode logits."""

    def __init__(self, model: Any):
        self.model = model
        self.cache: list[Any] | None = None  # one batch cache per layer
        self.pending: mx.array | None = None  # (K, V) logits of rows 0..K-1, in flight
        self.prompt_tokens_computed = 0

    @property
    def pending_rows(self) -> int:
        return 0 if self.pending is None else int(self.pending.shape[0])

    def new_cache(self) -> list[Any]:
        return make_prompt_cache(self.model)

    # --- prefill ---------------------------------------------------------------------------

    def prefill_chunk(self, cache: list[Any], tokens: list[int]) -> None:
        """A non-final chunk of one long prompt, into its own batch-1 cache."""
        self.model(mx.array(tokens)[None], cache=cache)
        mx.eval([c.state for c in cache])
        self.prompt_tokens_computed += len(tokens)

    def prefill_alone(self, cache: list[Any], tokens: list[int]) -> mx.array:
        """The rest of one prompt at batch 1; returns its next-token logits (1, V). The
        numerics of a prompt prefilled alone never depend on other requests."""
        logits = self.model(mx.array(tokens)[None], cache=cache)[:, -1, :]
        mx.eval(logits)
        self.prompt_tokens_computed += len(tokens)
        return logits

    def prefill_scored(
        self, cache: list[Any], tokens: list[int], targets: list[int], k: int
    ) -> tuple[mx.array, ChunkScores]:
        """One prompt's chunk at batch 1, keeping every position's logits to score
        `targets` (see prompt_scores). Returns the last position's logits (1, V) too."""
        logits = self.model(mx.array(tokens)[None], cache=cache)[0]
        scores = score(logits, targets, k)
        last = logits[-1:]
        mx.eval(last, scores, [c.state for c in cache])
        self.prompt_tokens_computed += len(tokens)
        return last, to_numpy(scores)

    def prefill_batch(
        self, caches: list[list[Any]], rests: list[list[int]]
    ) -> tuple[list[Any], mx.array]:
        """The rests of several prompts (plain KV caches) as one padded batch. Returns the
        merged batch cache (row i = prompt i) and the next-token logits (B, V)."""
        layers = len(caches[0])
        batch = [type(caches[0][i]).merge([c[i] for c in caches]) for i in range(layers)]
        lengths = [len(r) for r in rests]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        tokens = mx.array([r + [0] * p for r, p in zip(rests, padding, strict=True)])
        if max(padding) > 0:
            for c in batch:
                c.prepare(right_padding=padding)
        logits = self.model(tokens, cache=batch)
        last = logits[mx.arange(len(rests)), mx.array(lengths) - 1]
        if max(padding) > 0:
            for c in batch:
                c.finalize()
        mx.eval(last, [c.state for c in batch])
        self.prompt_tokens_computed += sum(lengths)
        return batch, last

    # --- the decode batch ------------------------------------------------------------------

    def join(self, rows: list[Any]) -> None:
        """Append a batch cache's rows to the decode batch (they have no pending logits)."""
        if self.cache is None:
            self.cache = rows
        else:
            for mine, new in zip(self.cache, rows, strict=True):
                mine.extend(new)

    @staticmethod
    def as_batch(cache: list[Any], copies: int) -> list[Any]:
        """A batch-1 cache as a batch cache of `copies` identical rows."""
        rows = [c.merge([c] * copies) if hasattr(c, "merge") else None for c in cache]
        if any(r is None for r in rows):
            raise RuntimeError("this model's cache type cannot be batched")
        return rows

    @staticmethod
    def select(batch: list[Any], rows: list[int]) -> list[Any]:
        """Rows of a batch cache, in place; a row may be repeated (`n` > 1 choices)."""
        index = mx.array(rows)
        for c in batch:
            c.filter(index)
        return batch

    def queue_decode(self, inputs: mx.array) -> None:
        """Start the forward pass of one token per row; its logits become `pending`."""
        assert self.cache is not None
        logits = self.model(inputs[:, None], cache=self.cache)[:, -1, :]
        mx.async_eval(logits)
        self.pending = logits

    def keep(self, rows: list[int], total: int) -> None:
        """Keep only these rows (of `total`) of the batch cache and the pending logits."""
        if len(rows) == total:
            return
        k = self.pending_rows
        if self.pending is not None:
            pend = [i for i in rows if i < k]
            self.pending = self.pending[mx.array(pend)] if pend else None
        if not rows:
            self.cache = None
        elif self.cache is not None:
            index = mx.array(rows)
            for c in self.cache:
                c.filter(index)

    def extract(self, row: int) -> list[Any]:
        """A batch-1 copy of one row's cache (prompt and generated tokens so far)."""
        assert self.cache is not None
        return [c.extract(row) for c in self.cache]

    def kv_bytes(self) -> int:
        return 0 if self.cache is None else int(sum(c.nbytes for c in self.cache))
