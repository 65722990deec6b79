"""The prompt cache of one worker: the one place that decides RAM versus disk.

A request starts from the longest cached prefix of its prompt, whichever tier holds more
of it (RAM wins ties: it costs nothing to load). Finished sequences go to RAM, and plain
KV caches also to disk (written by the disk tier's background thread). Untrimmable caches
(sliding window, SSM) are kept in RAM only, as exact-prefix checkpoints of prompts.
A disk tier that could not open its folder (`disk.disabled`) is left out: RAM serves alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .disk_cache import DiskCache
from .prefix_cache import RamPrefixCache


@dataclass(slots=True)
class Lookup:
    tokens: int  # leading prompt tokens the cache holds (0: start from scratch)
    cache: list[Any] | None  # batch-1 per-layer caches, or None
    source: str  # "ram" | "disk" | "none"
    miss_reason: str | None


class PromptCache:
    def __init__(self, ram: RamPrefixCache, disk: DiskCache | None = None):
        self.ram = ram
        self.disk = disk

    @property
    def enabled(self) -> bool:
        return self.ram.max_bytes > 0 or self._usable_disk() is not None

    def _usable_disk(self) -> DiskCache | None:
        return self.disk if self.disk is not None and not self.disk.disabled else None

    def lookup(self, prompt: list[int], session: str | None) -> Lookup:
        hit = self.ram.lookup(prompt)
        found = Lookup(hit.tokens, hit.cache, hit.source, hit.miss_reason)
        disk = self._usable_disk()
        if disk is None:
            return found
        disk.touch_session(session, prompt)
        matched = disk.match(prompt)
        on_disk = min(matched, len(prompt) - 1)  # leave one token to compute logits from
        if on_disk > found.tokens and on_disk >= disk.min_tokens:
            # A damaged block cuts the chain short: the blocks before it still serve.
            layers = disk.load(prompt, matched, at_least=max(disk.min_tokens, found.tokens + 1))
            if layers is not None:
                n = min(layers[0][0].shape[2], len(prompt) - 1)
                return Lookup(n, _cache_from(layers, n), "disk", None)
            on_disk = 0
        if found.cache is None:
            disk.stats.misses += 1
            found.miss_reason = (
                disk.explain_miss(prompt)
                or ("below_minimum" if on_disk > 0 else None)
                or found.miss_reason
            )
        return found

    def store(self, tokens: list[int], cache: list[Any], session: str | None) -> None:
        """Keep a batch-1 cache holding exactly `tokens` (a finished sequence or prompt)."""
        self.ram.store(list(tokens), cache)
        disk = self._usable_disk()
        if disk is not None and plain(cache):
            disk.submit(list(tokens), cache, session)

    def store_prompt(self, prompt: list[int], cache: list[Any], session: str | None) -> None:
        """A prompt whose cache goes on being used (it is copied: later appends must not
        reach the stored entry)."""
        self.store(prompt, [copy.copy(c) for c in cache], session)

    def checkpoint(self, prompt: list[int], cache: list[Any]) -> None:
        """Untrimmable caches are reused only as exact prefixes: checkpoint the prompt,
        which the next turn's prompt starts with."""
        self.ram.store_checkpoint(prompt, cache)

    def clear(self) -> None:
        self.ram.clear()
        if self.disk is not None:
            self.disk.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "prefix_cache": dict(self.ram.stats, entries=len(self.ram), bytes=self.ram.nbytes),
            "disk_cache": self.disk.describe() if self.disk is not None else None,
        }


def plain(cache: list[Any]) -> bool:
    """Every layer is a plain KVCache: trimmable, batchable, storable on disk."""
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
