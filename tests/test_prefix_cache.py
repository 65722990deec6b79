import mlx.core as mx
from mlx_lm.models.cache import KVCache

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
