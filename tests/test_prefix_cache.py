import copy
import gc

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxtg.worker.prefix_cache import RamPrefixCache


def kv(n: int) -> list[KVCache]:
    c = KVCache()
    c.keys = mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1)
    c.values = -c.keys
    c.offset = n
    return [c]


def test_longest_prefix_and_minimum():
    cache = RamPrefixCache(1 << 20, min_tokens=3)
    cache.store([1, 2, 3, 4, 5], kv(5))
    hit = cache.lookup([1, 2, 3, 4, 9, 9])
    assert (hit.tokens, hit.source) == (4, "ram")
    assert hit.cache is not None and hit.cache[0].offset == 4
    assert cache.lookup([1, 2, 7]).miss_reason == "below_minimum"
    assert cache.lookup([8, 8, 8, 8]).miss_reason == "no_match"


def test_always_leaves_one_token_to_prefill_and_reports_divergence():
    cache = RamPrefixCache(1 << 20, min_tokens=1)
    cache.store([1, 2, 3, 4, 5, 6], kv(6))
    assert cache.lookup([1, 2, 3]).tokens == 2
    hit = cache.lookup([1, 2, 3, 0, 0, 0, 0])
    assert hit.tokens == 3 and hit.miss_reason == "diverged_at_token_3"


def test_slices_are_copies_that_later_appends_cannot_alter():
    cache = RamPrefixCache(1 << 20, min_tokens=1)
    cache.store([1, 2, 3, 4], kv(4))
    hit = cache.lookup([1, 2, 3, 9])
    assert hit.cache is not None
    c = hit.cache[0]
    c.update_and_fetch(mx.full((1, 1, 1, 1), 100.0), mx.full((1, 1, 1, 1), 100.0))
    again = cache.lookup([1, 2, 3, 4, 7])
    assert again.cache is not None
    assert again.cache[0].keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_extensions_replace_and_other_entries_survive():
    cache = RamPrefixCache(1 << 20, min_tokens=1)
    cache.store([1, 2, 3], kv(3))
    cache.store([5, 6, 7], kv(3))
    cache.store([1, 2, 3, 4], kv(4))  # covers [1, 2, 3]
    assert len(cache) == 2
    cache.store([1, 2], kv(2))  # already covered: nothing new
    assert len(cache) == 2


def test_byte_and_count_budgets_evict_lru():
    one = sum(c.nbytes for c in kv(4))
    cache = RamPrefixCache(2 * one, max_entries=8, min_tokens=1)
    for i in range(3):
        cache.store([10 * i + j for j in range(4)], kv(4))
    assert len(cache) == 2 and cache.stats["evicted"] == 1
    assert cache.lookup([0, 1, 2, 3, 4]).source == "none"


def _batch_rows(batch_size: int, positions: int, layers: int = 2) -> list[BatchKVCache]:
    """A batch cache as the engine holds it: rows in one step-allocated buffer per layer."""
    out = []
    for layer in range(layers):
        c = BatchKVCache([0] * batch_size)
        k = mx.random.normal((batch_size, 4, positions, 32), key=mx.random.key(layer))
        c.update_and_fetch(k, -k)
        out.append(c)
    mx.eval([(c.keys, c.values) for c in out])
    return out


def test_stored_entries_hold_only_the_bytes_they_report():
    gc.collect()
    base = mx.get_active_memory()
    cache = RamPrefixCache(1 << 30, max_entries=64, min_tokens=1)
    for burst in range(8):
        batch = _batch_rows(8, 300)
        for row in range(2):
            # Finished rows are extracted (lazily) while the batch goes on decoding.
            cache.store([burst * 2 + row + 1000, *range(299)], [c.extract(row) for c in batch])
        step = mx.zeros((8, 4, 1, 32))
        for c in batch:
            c.update_and_fetch(step, step)
        mx.eval([(c.keys, c.values) for c in batch])
        del batch, step, c
    single = KVCache()  # a prompt's own cache: a 256-position buffer holding 20
    single.update_and_fetch(mx.ones((1, 4, 20, 32)), mx.ones((1, 4, 20, 32)))
    cache.store(list(range(20)), [copy.copy(single)])
    del single
    gc.collect()
    assert len(cache) == 17
    held = mx.get_active_memory() - base
    # Lazy or view entries would pin each burst's whole 8-row buffers: 7x the reported bytes.
    assert cache.nbytes <= held <= 1.2 * cache.nbytes + (1 << 20), (held, cache.nbytes)
    hit = cache.lookup([1000 + 5, *range(299), 7])
    assert hit.tokens == 300 and hit.cache is not None
    del hit
    cache.clear()
    gc.collect()
    assert mx.get_active_memory() - base <= 1 << 20
