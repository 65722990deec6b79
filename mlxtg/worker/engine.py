"""The MLX side of a step: chunked prefill, the batched decode forward pass, sampling.

Prefill runs one request at a time with batch size 1 (so its numerics never depend on
what else runs). When a prompt is done its cache is merged into the decode batch, one
row per choice (`n > 1` shares the prefill). Decode runs every running sequence in one
forward pass over mlx-lm's BatchKVCache, whose left padding and mask keep rows apart.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..protocol import Delta
from .disk_cache import DiskCache
from .loader import LoadedModel
from .prefix_cache import RamPrefixCache
from .sampler import RowState, sample, top_logprobs
from .scheduler import PrefillChunk, Request
from .sequence import RequestPayload, Sequence, logprob_entry
from .text import TextStream, TokenBytes


class Engine:
    """Owns the model, the decode batch and its KV cache. Called from one thread only."""

    def __init__(
        self,
        loaded: LoadedModel,
        prefix_cache: RamPrefixCache,
        guided: Any = None,
        disk: DiskCache | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.vocab_size
        self.eos_ids = frozenset(loaded.eos_ids)
        self.prefix_cache = prefix_cache
        self.disk = disk
        self.guided = guided  # GuidedCompiler or None
        self.token_bytes = TokenBytes(loaded.tokenizer._tokenizer)
        self.batch: list[Sequence] = []
        self._cache: list[Any] | None = None  # one batch cache per layer, rows = self.batch
        self.tokens_generated = 0
        self.mask_seconds = 0.0  # time spent computing guided masks in decode steps
        self.mask_rows = 0  # guided rows masked (one per constrained token)
        self.prompt_tokens_computed = 0

    # --- prefill ---------------------------------------------------------------------------

    def attach_prefix(self, req: Request) -> tuple[int, str, str | None]:
        """Start a request from the longest cached prefix of its prompt, from RAM or disk
        (first-class path: any cache handed over here just needs to hold exactly
        `num_computed` tokens). Returns (cached tokens, source, miss reason)."""
        session = getattr(req.payload, "cache_key", None)
        hit = self.prefix_cache.lookup(req.prompt)
        source, reason, cache, n = hit.source, hit.miss_reason, hit.cache, hit.tokens
        if self.disk is not None:
            self.disk.touch_session(session, req.prompt)
            on_disk = min(self.disk.match(req.prompt), len(req.prompt) - 1)
            if on_disk > n and on_disk >= self.disk.min_tokens:
                layers = self.disk.load(req.prompt, self.disk.match(req.prompt))
                if layers is not None:
                    cache, n, source, reason = _cache_from(layers, on_disk), on_disk, "disk", None
                elif cache is None:
                    reason = "corrupt"
            elif cache is None and on_disk > 0:
                reason = "below_minimum"
                self.disk.stats.misses += 1
            elif cache is None:
                self.disk.stats.misses += 1
                reason = self.disk.explain_miss(req.prompt) or reason
        if cache is None:
            cache, n = make_prompt_cache(self.model), 0
        req.cache = cache
        req.num_computed = n
        return n, source, reason

    def prefill(self, chunk: PrefillChunk) -> mx.array | None:
        """Run one chunk of a prompt; on the last chunk return the next-token logits (1, V)."""
        req = chunk.request
        tokens = mx.array(req.prompt[chunk.start : chunk.end])[None]
        logits = self.model(tokens, cache=req.cache)
        self.prompt_tokens_computed += chunk.end - chunk.start
        if chunk.is_last:
            last = logits[:, -1, :]
            mx.eval(last)
            return last
        mx.eval([c.state for c in req.cache])
        return None

    def start(self, req: Request, logits: mx.array) -> list[Delta]:
        """Turn a prefilled request into `n` running sequences and emit their first tokens."""
        payload: RequestPayload = req.payload
        seqs = [self._new_sequence(req, payload, i) for i in range(req.n)]
        rows = [s.row for s in seqs]
        masks = self._masks(seqs)
        result = sample(mx.repeat(logits, req.n, axis=0), rows, masks)
        deltas = [self._advance(s, i, result) for i, s in enumerate(seqs)]
        live = [s for s in seqs if not s.finished]
        if not _plain(req.cache):
            # Untrimmable caches (sliding window, SSM) are reused only as exact prefixes:
            # checkpoint the prompt, which the next turn's prompt starts with.
            self.prefix_cache.store_checkpoint(req.prompt, req.cache)
        if live:
            self._join(req.cache, live)
        if not live:
            self._store_prompt(req.prompt, req.cache, payload.cache_key)
        req.cache = None
        return deltas

    def _new_sequence(self, req: Request, payload: RequestPayload, index: int) -> Sequence:
        params = payload.params
        guide = None
        if payload.guide_spec is not None and self.guided is not None:
            guide = self.guided.new_state(payload.guide_spec)
        row = RowState.create(
            params,
            self.vocab_size,
            req.prompt,
            seed_offset=index,
            guide=guide,
            eos_ids=list(self.eos_ids),
        )
        return Sequence(
            request_id=req.request_id,
            index=index,
            prompt=req.prompt,
            session=payload.cache_key,
            row=row,
            text=TextStream(self.tokenizer.detokenizer, params.stop),
            max_tokens=payload.max_tokens,
            eos_ids=self.eos_ids,
            parser=payload.parser_factory() if payload.parser_factory else None,
        )

    def _join(self, cache: list[Any], seqs: list[Sequence]) -> None:
        rows = [c.merge([c] * len(seqs)) if hasattr(c, "merge") else None for c in cache]
        if any(r is None for r in rows):
            raise RuntimeError("this model's cache type cannot be batched")
        if self._cache is None or not self.batch:
            self._cache = rows
        else:
            for mine, new in zip(self._cache, rows, strict=True):
                mine.extend(new)
        self.batch.extend(seqs)

    # --- decode ----------------------------------------------------------------------------

    def decode(self) -> list[Delta]:
        """One token for every running sequence."""
        if not self.batch:
            return []
        inputs = mx.array([s.last_token for s in self.batch])[:, None]
        logits = self.model(inputs, cache=self._cache)[:, -1, :]
        mx.async_eval(logits)
        started = time.perf_counter()
        masks = self._masks(self.batch)  # CPU work overlapping the forward pass
        if masks is not None:
            self.mask_seconds += time.perf_counter() - started
            self.mask_rows += sum(1 for s in self.batch if s.row.guide is not None)
        result = sample(logits, [s.row for s in self.batch], masks)
        deltas = [self._advance(s, i, result) for i, s in enumerate(self.batch)]
        self._drop_finished()
        return deltas

    def _masks(self, seqs: list[Sequence]) -> np.ndarray | None:
        """(B, V) allowed tokens for a batch with guided rows (unguided rows all True)."""
        guides = [s.row.guide for s in seqs]
        if self.guided is None or all(g is None for g in guides):
            return None
        masks: np.ndarray = self.guided.batch_masks(guides)
        return masks

    def _advance(self, seq: Sequence, row: int, result: Any) -> Delta:
        token = result.tokens[row]
        entry = None
        params = seq.row.params
        if params.logprobs and result.logprobs is not None:
            lp = float(result.logprobs[row, token].item())
            top = (
                top_logprobs(result.logprobs, row, params.top_logprobs)
                if params.top_logprobs
                else []
            )
            entry = logprob_entry(self.token_bytes, token, lp, top)
        self.tokens_generated += 1
        return seq.advance(token, entry)

    # --- leaving the batch -----------------------------------------------------------------

    def _drop_finished(self) -> None:
        if not any(s.finished for s in self.batch):
            return
        self._store_finished()
        self._keep([i for i, s in enumerate(self.batch) if not s.finished])

    def abort(self, request_id: str) -> list[Delta]:
        hit = [i for i, s in enumerate(self.batch) if s.request_id == request_id]
        if not hit:
            return []
        deltas = [self.batch[i].abort() for i in hit]
        self._keep([i for i in range(len(self.batch)) if i not in hit])
        return deltas

    def _keep(self, keep: list[int]) -> None:
        self.batch = [self.batch[i] for i in keep]
        if not keep:
            self._cache = None
        elif self._cache is not None:
            for c in self._cache:
                c.filter(keep)

    def _store_finished(self) -> None:
        if self._cache is None or (self.prefix_cache.max_bytes <= 0 and self.disk is None):
            return
        for i, s in enumerate(self.batch):
            if s.finished and s.index == 0 and s.finish_reason != "error":
                # The cache holds the prompt and every output token but the last.
                cache = [c.extract(i) for c in self._cache]
                size = cache[0].offset if cache else 0
                tokens = (s.prompt + s.output)[:size]
                if len(tokens) == size:
                    self.prefix_cache.store(tokens, cache)
                    if self.disk is not None and _plain(cache):
                        self.disk.submit(tokens, cache, s.session)

    def _store_prompt(self, prompt: list[int], cache: list[Any], session: str | None) -> None:
        """A request that ended at its first token still leaves its prompt's cache."""
        self.prefix_cache.store(list(prompt), [copy.copy(c) for c in cache])
        if self.disk is not None and _plain(cache):
            self.disk.submit(list(prompt), cache, session)

    def clear_caches(self) -> None:
        self.prefix_cache.clear()
        if self.disk is not None:
            self.disk.clear()

    # --- introspection ---------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.batch)

    def kv_bytes(self) -> int:
        if self._cache is None:
            return 0
        return int(sum(c.nbytes for c in self._cache))


def _plain(cache: list[Any]) -> bool:
    from mlx_lm.models.cache import KVCache

    return all(type(c) is KVCache for c in cache)


def _cache_from(layers: list[tuple[Any, Any]], n: int) -> list[Any]:
    """KVCache per layer from loaded (keys, values), holding the first `n` positions."""
    from mlx_lm.models.cache import KVCache

    out = []
    for k, v in layers:
        c = KVCache()
        c.keys, c.values, c.offset = k, v, n
        out.append(c)
    return out
