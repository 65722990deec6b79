"""The disk tier under a bad folder, damaged blocks, odd files and a full disk: the worker
always serves (from RAM alone if it must) and says what went wrong."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import mlx.core as mx
import pytest
from test_disk_cache import kv, make

from mlxtg.cli.render import print_caches, print_status
from mlxtg.kv_files import clear_caches, list_caches
from mlxtg.worker import disk_cache
from mlxtg.worker.disk_cache import DiskCache, chain_hashes
from mlxtg.worker.prefix_cache import RamPrefixCache
from mlxtg.worker.prompt_cache import PromptCache


def _file_as_parent(home: Path) -> Path:
    (home / "home").write_text("a file")  # like a read-only folder: nothing can be made in it
    return home / "home" / "kv-cache"


def _file_as_root(home: Path) -> Path:
    (home / "kv-cache").write_text("a file")
    return home / "kv-cache"


def _meta_json_folder(home: Path) -> Path:
    (home / "kv-cache" / "fp1" / "meta.json").mkdir(parents=True)
    return home / "kv-cache"


@pytest.mark.parametrize("bad", [_file_as_parent, _file_as_root, _meta_json_folder])
def test_unusable_folder_turns_the_tier_off_with_a_reason(tmp_path: Path, caplog, bad):
    root = bad(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlxtg.worker"):
        disk = make(root)
    assert disk.disabled and disk.describe()["disabled"] == disk.disabled
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert disk.disabled in caplog.records[0].getMessage()
    tokens = list(range(12))
    assert disk.submit(tokens, kv(tokens)) is None
    disk.flush()
    disk.clear()
    assert disk.match(tokens) == 0 and disk.load(tokens, 8) is None
    cache = PromptCache(RamPrefixCache(1 << 20, min_tokens=4), disk)
    cache.store(tokens, kv(tokens), None)
    hit = cache.lookup([*tokens, 99], None)
    assert (hit.source, hit.tokens) == ("ram", 12)
    assert cache.stats()["disk_cache"]["disabled"] == disk.disabled
    assert all(e["blocks"] == 0 for e in list_caches(root))
    clear_caches(root=root)  # `mlxtg cache clear` removes what it can


def test_blocks_discarded_at_start_up_explain_the_miss_as_corrupt(tmp_path: Path):
    tokens = list(range(12))
    disk = make(tmp_path)
    disk.submit(tokens, kv(tokens))
    disk.flush()
    second = disk._path(chain_hashes(tokens, 4)[1])
    second.write_bytes(second.read_bytes()[:40])  # truncated inside its header
    again = make(tmp_path, min_tokens=8)  # one block left: below the minimum
    assert again.stats.corrupt == 1 and not second.exists()
    found = PromptCache(RamPrefixCache(0), again).lookup([*tokens, 99], None)
    assert (found.source, found.miss_reason) == ("none", "corrupt")
    assert list_caches(tmp_path)[0]["corrupt"] == 1  # persisted for `mlxtg cache ls`


def test_a_bad_block_mid_chain_keeps_the_blocks_before_it(tmp_path: Path):
    tokens = list(range(16))
    disk = make(tmp_path)
    disk.submit(tokens, kv(tokens))
    disk.flush()
    third = disk._path(chain_hashes(tokens, 4)[2])
    data = bytearray(third.read_bytes())
    data[-3] ^= 0xFF
    third.write_bytes(bytes(data))
    found = PromptCache(RamPrefixCache(0), disk).lookup([*tokens, 99], None)
    assert (found.source, found.tokens) == ("disk", 8)
    assert found.cache is not None
    for c, expect in zip(found.cache, kv(tokens[:8]), strict=True):
        assert mx.array_equal(c.keys, expect.keys) and c.offset == 8
    assert disk.stats.corrupt == 1 and disk.stats.hits == 1
    assert disk.match(tokens) == 8


@pytest.mark.timeout(60)
def test_fifos_and_folders_where_files_should_be_are_skipped_not_waited_on(tmp_path: Path):
    tokens = list(range(12))
    disk = make(tmp_path)
    disk.submit(tokens, kv(tokens))
    disk.flush()
    hashes = chain_hashes(tokens, 4)
    first, second = disk._path(hashes[0]), disk._path(hashes[1])
    second.unlink()
    os.mkfifo(second)  # under a running worker: a load reads the blocks before it
    found = PromptCache(RamPrefixCache(0), disk).lookup([*tokens, 99], None)
    assert (found.source, found.tokens) == ("disk", 4)
    first.unlink()
    first.mkdir()
    for name in ("index.json", "meta.json"):
        (disk.dir / name).unlink()
        os.mkfifo(disk.dir / name)
    again = make(tmp_path)  # at start-up: skipped, neither read nor counted as corrupt
    assert again.disabled is None and again.stats.corrupt == 0
    assert again.match(tokens) == 0 and len(again) == 1  # only the third block is a file
    (disk.dir / "meta.json").unlink()
    os.mkfifo(disk.dir / "meta.json")
    listed = list_caches(tmp_path)[0]
    assert (listed["model"], listed["blocks"]) == ("?", 1)


def _full_disk(monkeypatch, disk: DiskCache, quota: int) -> None:
    """Block writes fail with ENOSPC once the cache's files would pass `quota` bytes."""
    real = disk_cache._write_bytes

    def write(path: Path, data: bytes) -> None:
        block = not path.name.startswith(("index", "meta"))
        if block and disk.nbytes + len(data) > quota:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(disk_cache, "_write_bytes", write)


def test_a_full_disk_evicts_to_make_room(tmp_path: Path, monkeypatch, caplog):
    disk = make(tmp_path)
    one = [0] * 8
    disk.submit(one, kv(one))
    disk.flush()
    _full_disk(monkeypatch, disk, quota=disk.nbytes + 100)  # room for about one sequence
    with caplog.at_level(logging.WARNING, logger="mlxtg.worker"):
        for i in range(1, 5):
            seq = [i] * 8
            disk.submit(seq, kv(seq))
            disk.flush()
            assert disk.match(seq) == 8  # the newest sequence always gets written
    assert disk.stats.evicted >= 3 and disk.stats.write_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "KV" in r.msg]


def test_write_errors_are_counted_and_logged_once_without_tracebacks(
    tmp_path: Path, monkeypatch, caplog
):
    disk = make(tmp_path)

    def fail(path: Path, data: bytes) -> None:
        if "index" not in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        path.write_bytes(data)

    monkeypatch.setattr(disk_cache, "_write_bytes", fail)
    with caplog.at_level(logging.DEBUG, logger="mlxtg.worker"):
        for i in range(5):
            seq = [i] * 8
            disk.submit(seq, kv(seq))
            disk.flush()
    assert disk.stats.write_errors == 5 and len(disk) == 0
    assert not list(disk.dir.glob("*/*.tmp*"))
    assert not [r for r in caplog.records if r.exc_info]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    entry = list_caches(tmp_path)[0]
    assert entry["write_errors"] == 5


def test_status_and_cache_ls_show_the_reason_and_the_counts(tmp_path: Path, capsys):
    disk = make(_file_as_root(tmp_path))
    worker = {"pid": 1, "stats": {"disk_cache": disk.describe(), "prefix_cache": {}}}
    print_status({"models": [{"name": "m", "state": "ready", "worker": worker}]})
    assert f"disk DISABLED ({disk.disabled})" in capsys.readouterr().out
    good = make(tmp_path / "good")
    worker["stats"]["disk_cache"] = good.describe()
    print_status({"models": [{"name": "m", "state": "ready", "worker": worker}]})
    assert "corrupt 0 write errors 0" in capsys.readouterr().out
    print_caches([{**e, "corrupt": 2, "write_errors": 3} for e in list_caches(tmp_path / "good")], "")
    assert "corrupt 2  write errors 3" in capsys.readouterr().out
