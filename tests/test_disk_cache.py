"""The disk tier of the prompt cache, on a tiny random model (real MLX arrays, real files)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlxtg.kv_files import clear_caches, list_caches
from mlxtg.worker.disk_cache import DiskCache, chain_hashes

LAYERS, HEADS, DIM = 2, 2, 8


def kv(tokens: list[int], dtype=mx.float32) -> list[KVCache]:
    """A fake but deterministic KV cache: position i of layer l holds l * 1000 + token."""
    out = []
    for layer in range(LAYERS):
        base = mx.array([layer * 1000 + t for t in tokens], dtype=mx.float32)
        k = mx.broadcast_to(base[None, None, :, None], (1, HEADS, len(tokens), DIM)).astype(dtype)
        c = KVCache()
        c.keys, c.values, c.offset = k, -k, len(tokens)
        out.append(c)
    return out


def make(root: Path, **kw) -> DiskCache:
    args = dict(max_bytes=1 << 30, max_slots=50, block_tokens=4, min_tokens=4) | kw
    return DiskCache(root, "fp1", "model-a", **args)


def test_chain_hashes_name_whole_prefixes():
    a = chain_hashes(list(range(12)), 4)
    b = chain_hashes([*range(4), 99, *range(5, 12)], 4)
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1] and a[2] != b[2]
    assert chain_hashes([1, 2, 3], 4) == []


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_round_trip_survives_a_restart(tmp_path: Path, dtype):
    tokens = list(range(10))
    disk = make(tmp_path)
    disk.submit(tokens, kv(tokens, dtype))
    disk.flush()
    again = make(tmp_path)  # a new process would see the same files
    assert again.match(tokens + [50, 51]) == 8
    layers = again.load(tokens, 8)
    assert layers is not None
    expect = kv(tokens[:8], dtype)
    for (k, v), c in zip(layers, expect, strict=True):
        assert k.dtype == dtype
        assert mx.array_equal(k, c.keys) and mx.array_equal(v, c.values)


def test_reads_only_the_needed_blocks_and_never_overwrites_other_slots(tmp_path: Path):
    disk = make(tmp_path)
    a = [1] * 8 + [2] * 8
    b = [1] * 8 + [3] * 8
    disk.submit(a, kv(a))
    disk.submit(b, kv(b))
    disk.flush()
    assert len(disk) == 6  # 2 shared + 2 + 2
    assert disk.slots() == 2
    assert disk.match(a) == 16 and disk.match(b) == 16
    assert disk.match([1] * 8 + [4] * 8) == 8


def test_corrupt_or_truncated_block_is_discarded_and_counted(tmp_path: Path):
    tokens = list(range(12))
    disk = make(tmp_path)
    disk.submit(tokens, kv(tokens))
    disk.flush()
    second = disk._path(chain_hashes(tokens, 4)[1])
    data = bytearray(second.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data: only the checksum can tell
    second.write_bytes(bytes(data))
    layers = disk.load(tokens, 12)  # the block before the damaged one still serves
    assert layers is not None and layers[0][0].shape[2] == 4
    assert disk.stats.corrupt == 1
    assert not second.exists()
    assert disk.explain_miss(tokens) == "corrupt"
    assert disk.match(tokens) == 4
    first = disk._path(chain_hashes(tokens, 4)[0])
    first.write_bytes(first.read_bytes()[:50])  # truncated
    assert make(tmp_path).match(tokens) == 0


def test_eviction_drops_tails_before_shared_prefixes_and_spares_sessions(tmp_path: Path):
    disk = make(tmp_path, max_slots=2)
    system = [7] * 8
    convs = [system + [i] * 4 for i in range(3)]
    disk.submit(convs[0], kv(convs[0]), session="agent-0")
    disk.flush()
    for c in convs[1:]:
        disk.submit(c, kv(c))
        disk.flush()
    assert disk.slots() == 2
    assert disk.match(convs[0]) == 12  # protected by its active session
    assert disk.match(system) == 8  # the shared prefix survives
    assert [disk.match(c) for c in convs[1:]].count(12) == 1


def test_byte_budget(tmp_path: Path):
    disk = make(tmp_path, max_bytes=1)
    disk.submit([1] * 8, kv([1] * 8))
    disk.flush()
    assert disk.nbytes <= 1 and len(disk) == 0


def test_cache_ls_and_clear_by_model(tmp_path: Path):
    root = tmp_path / "kv"
    a = DiskCache(root, "fpA", "model-a", max_bytes=1 << 30, block_tokens=4, min_tokens=4)
    b = DiskCache(root, "fpB", "model-b", max_bytes=1 << 30, block_tokens=4, min_tokens=4)
    a.submit(list(range(8)), kv(list(range(8))))
    b.submit(list(range(4)), kv(list(range(4))))
    a.flush()
    b.flush()
    listed = {e["model"]: e for e in list_caches(root)}
    assert listed["model-a"]["blocks"] == 2 and listed["model-a"]["tokens"] == 8
    assert listed["model-a"]["slots"] == 1 and listed["model-b"]["bytes"] > 0
    assert clear_caches("model-a", root) == ["model-a (fpA)"]
    assert [e["model"] for e in list_caches(root)] == ["model-b"]


def test_misses_are_explained(tmp_path: Path):
    tokens = list(range(8))
    disk = make(tmp_path, max_slots=1)
    disk.submit(tokens, kv(tokens))
    disk.flush()
    other = [9] * 8
    disk.submit(other, kv(other))
    disk.flush()
    assert disk.explain_miss(tokens) == "evicted"
    requantised = DiskCache(
        tmp_path, "fp2", "model-a", max_bytes=1 << 30, block_tokens=4, min_tokens=4
    )
    assert requantised.explain_miss(other) == "fingerprint_mismatch"
    assert requantised.explain_miss([5] * 8) is None
    assert requantised.explain_miss([5]) == "below_minimum"
