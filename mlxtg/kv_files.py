"""The on-disk KV cache seen from outside a worker: list and clear it by model.

Works whether the server runs or not (a running worker treats a vanished block as a miss).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from . import paths


def cache_root() -> Path:
    return paths.home() / "kv-cache"


def list_caches(root: Path | None = None) -> list[dict[str, Any]]:
    """One entry per (model, fingerprint) folder: slots, tokens, bytes, last use, hits."""
    root = root or cache_root()
    out = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        try:
            index = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError):
            index = {}
        files, size = [], 0
        for f in folder.glob("*/*.safetensors"):
            try:  # a running worker may delete blocks while we look
                size += f.stat().st_size
                files.append(f)
            except OSError:
                continue
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
                "last_used": max(
                    (float(v.get("last_used", 0)) for v in index.values()), default=None
                ),
                "hits": sum(int(v.get("hits", 0)) for v in index.values()),
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
