"""Hot prefix cache in RAM: finished sequences' KV caches, reused by longest prefix.

A new request starts from the longest stored prefix of its tokens and prefills only the
rest. Storing a conversation that extends a stored one replaces it (the new one covers
it); any other stored entry is kept, so agents alternating long prompts keep both.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class Hit:
    tokens: int  # how many leading prompt tokens the returned cache holds
    cache: list[Any] | None
    source: str  # "ram" | "none"
    miss_reason: str | None = None


@dataclass(slots=True)
class _Entry:
    tokens: np.ndarray
    cache: list[Any]
    nbytes: int
    hits: int = 0
    exact: bool = False  # a checkpoint of a cache that cannot be trimmed: whole-entry reuse only


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def _nbytes(cache: Any) -> int:
    try:
        return int(cache.nbytes)
    except (AttributeError, TypeError):
        return 0


def _trimmable(cache: list[Any]) -> bool:
    from mlx_lm.models.cache import KVCache

    return all(type(c) is KVCache for c in cache)


def _owned(cache: list[Any], n: int) -> list[Any]:
    """Plain KV caches holding exactly the first `n` positions, in buffers of their own.

    A row extracted from a batch is a lazy slice: until evaluated it keeps the whole batch
    buffer alive, and an evaluated view keeps its source's buffer. `mx.array` always copies
    (`mx.contiguous` may share a buffer up to 16 KB larger), so the bytes counted are the
    bytes held."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        k = KVCache()
        k.keys = mx.array(c.keys[..., :n, :])
        k.values = mx.array(c.values[..., :n, :])
        k.offset = n
        out.append(k)
    mx.eval([(c.keys, c.values) for c in out])
    return out


def _snapshot(cache: list[Any]) -> list[Any]:
    """A deep copy of caches of any type, every array an evaluated copy (see `_owned`)."""
    import mlx.core as mx

    made: list[Any] = []

    def own(x: Any) -> Any:
        if isinstance(x, mx.array):
            made.append(mx.array(x))
            return made[-1]
        if isinstance(x, list | tuple):
            return type(x)(own(v) for v in x)
        if hasattr(x, "__dict__"):  # a nested cache (CacheList)
            for name, value in vars(x).items():
                setattr(x, name, own(value))
        return x

    snapshot = [own(c) for c in copy.deepcopy(cache)]
    mx.eval(made)
    return snapshot


def _slice(cache: list[Any], n: int) -> list[Any]:
    """A copy of the first n positions that later appends cannot alter."""
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        k = KVCache()
        k.keys = c.keys[..., :n, :]
        k.values = c.values[..., :n, :]
        k.offset = n
        out.append(k)
    return out


class RamPrefixCache:
    """LRU of KV caches within a byte budget and an entry count."""

    def __init__(
        self,
        max_bytes: int,
        max_entries: int = 64,
        min_tokens: int = 16,
        explain: Callable[[Any, int], bool] | None = None,
    ):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.min_tokens = min_tokens
        # Reasoning models: whether a divergence at token N is the template dropping the
        # reasoning the stored tokens hold there (reasoning.reasoning_at).
        self.explain = explain
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        self.nbytes = 0
        self.stats = {"hits": 0, "misses": 0, "hit_tokens": 0, "stored": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: list[int]) -> Hit:
        """The longest usable cached prefix of `tokens` (always leaving >= 1 token to
        prefill, so the last position's logits get computed)."""
        if not self._entries or self.max_bytes <= 0:
            self.stats["misses"] += 1
            return Hit(0, None, "none", "empty" if self.max_bytes > 0 else "disabled")
        query = np.asarray(tokens, dtype=np.int64)
        best_id, best = -1, 0
        for eid, entry in self._entries.items():
            n = _common_prefix(query, entry.tokens)
            if entry.exact and (n < len(entry.tokens) or n >= len(tokens)):
                continue  # a checkpoint is usable only as a strict prefix of the prompt
            if n > best:
                best_id, best = eid, n
        best = min(best, len(tokens) - 1)
        if best_id < 0 or best <= 0:
            self.stats["misses"] += 1
            return Hit(0, None, "none", "no_match")
        if best < self.min_tokens:
            self.stats["misses"] += 1
            return Hit(0, None, "none", "below_minimum")
        entry = self._entries[best_id]
        self._entries.move_to_end(best_id)
        entry.hits += 1
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += best
        # A continuation that stops matching well before the end of the stored sequence
        # usually means the chat template renders earlier turns differently than the
        # model generated them: say so, it is the classic cause of poor reuse.
        reason = None
        if best < len(entry.tokens) - 1 and best < len(tokens) - 1:
            dropped = self.explain is not None and self.explain(entry.tokens, best)
            reason = f"{'reasoning_dropped' if dropped else 'diverged'}_at_token_{best}"
        cache = copy.deepcopy(entry.cache) if entry.exact else _slice(entry.cache, best)
        return Hit(best, cache, "ram", reason)

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a batch-1 cache holding exactly `tokens`."""
        if len(tokens) < self.min_tokens or self.max_bytes <= 0 or not _trimmable(cache):
            return
        n = len(tokens)
        if any(c.keys is None or c.offset < n for c in cache):
            return
        size = sum(n * (c.keys.nbytes + c.values.nbytes) // c.keys.shape[2] for c in cache)
        if size > self.max_bytes:
            return  # could never fit: keep what is stored, copy nothing
        arr = np.asarray(tokens, dtype=np.int64)
        for eid, entry in list(self._entries.items()):
            if entry.exact:
                continue
            if len(entry.tokens) <= len(arr) and _common_prefix(entry.tokens, arr) == len(
                entry.tokens
            ):
                self._drop(eid)  # the new entry covers it
            elif _common_prefix(entry.tokens, arr) == len(arr):
                self._entries.move_to_end(eid)  # already covered by a longer entry
                return
        owned = _owned(cache, n)
        self._add(_Entry(arr, owned, sum(c.nbytes for c in owned)))

    def store_checkpoint(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep a copy of a cache that cannot be trimmed (sliding-window or SSM layers),
        holding exactly `tokens`. It is reused only by prompts that start with all of
        `tokens`: the previous turn's prompt is such a prefix of the next turn's, so
        multi-turn chats still skip re-prefilling their history."""
        if len(tokens) < self.min_tokens or self.max_bytes <= 0:
            return
        arr = np.asarray(tokens, dtype=np.int64)
        for eid, entry in list(self._entries.items()):
            if (
                entry.exact
                and len(entry.tokens) == len(arr)
                and _common_prefix(entry.tokens, arr) == len(arr)
            ):
                self._entries.move_to_end(eid)
                return
        snapshot = _snapshot(cache)
        self._add(_Entry(arr, snapshot, sum(_nbytes(c) for c in snapshot), exact=True))

    def _add(self, entry: _Entry) -> None:
        if entry.nbytes > self.max_bytes:
            return
        self._entries[self._next_id] = entry
        self._next_id += 1
        self.nbytes += entry.nbytes
        self.stats["stored"] += 1
        while self._entries and (
            self.nbytes > self.max_bytes or len(self._entries) > self.max_entries
        ):
            self._drop(next(iter(self._entries)))
            self.stats["evicted"] += 1

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self.nbytes -= entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
