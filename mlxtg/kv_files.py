"""The on-disk KV cache seen from outside a worker: list and clear it by model.

Works whether the server runs or not (a running worker treats a vanished block as a miss).
Also the file helpers the worker's disk tier shares with it: a FIFO, directory or device
where a cache file should be is refused at once, never read from or waited on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from . import paths


class NotRegularFile(OSError):
    """Something other than a regular file sits where a cache file should be."""


def cache_root() -> Path:
    return paths.home() / "kv-cache"


@contextlib.contextmanager
def open_regular(path: Path) -> Iterator[IO[bytes]]:
    """Open a regular file for reading; NotRegularFile for anything else. O_NONBLOCK makes
    opening a FIFO return at once instead of waiting for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        yield f


def read_json(path: Path) -> Any:
    """A JSON file's contents; OSError or ValueError when it is missing, odd or damaged."""
    with open_regular(path) as f:
        return json.loads(f.read())


def read_index(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """A cache folder's index.json: per-block use counts and the persisted error counters
    (also the older layout, a bare mapping of blocks). Empty when missing or damaged."""
    try:
        data = read_json(folder / "index.json")
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(data, dict):
        return {}, {}
    blocks = data.get("blocks") if "blocks" in data else data
    counters = data.get("counters") if "blocks" in data else {}
    blocks = {h: v for h, v in (blocks or {}).items() if isinstance(v, dict)}
    counters = {k: v for k, v in (counters or {}).items() if isinstance(v, int)}
    return blocks, counters


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def list_caches(root: Path | None = None) -> list[dict[str, Any]]:
    """One entry per (model, fingerprint) folder: slots, tokens, bytes, last use, hits,
    and the corrupt blocks discarded and block writes failed there."""
    root = root or cache_root()
    out = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        try:
            meta = read_json(folder / "meta.json")
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        index, counters = read_index(folder)
        files, size = [], 0
        for f in folder.glob("*/*.safetensors"):
            try:
                st = f.stat()
            except OSError:  # a running worker may delete blocks while we look
                continue
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
                files.append(f)
        parents = {v.get("parent") for v in index.values()}
        block = int(meta.get("block_tokens", 0) or 0)
        out.append(
            {
                "model": meta.get("model", "?"),
                "fingerprint": folder.name,
                "blocks": len(files),
                "slots": sum(1 for h in index if h not in parents) if index else len(files) and 1,
                "tokens": len(files) * block,
                "bytes": size,
                "last_used": max((_num(v.get("last_used")) for v in index.values()), default=None),
                "hits": int(sum(_num(v.get("hits")) for v in index.values())),
                "corrupt": counters.get("corrupt", 0),
                "write_errors": counters.get("write_errors", 0),
                "path": str(folder),
            }
        )
    return out


def clear_caches(
    model: str | None = None, root: Path | None = None, skip: frozenset[str] = frozenset()
) -> list[str]:
    """Delete the disk cache of `model` (every model when None); returns what was removed.
    Folders whose fingerprint is in `skip` belong to running workers, which clear their own."""
    removed = []
    for entry in list_caches(root):
        if entry["fingerprint"] in skip:
            continue
        if model is None or entry["model"] == model:
            shutil.rmtree(entry["path"], ignore_errors=True)
            removed.append(f"{entry['model']} ({entry['fingerprint']})")
    return removed
