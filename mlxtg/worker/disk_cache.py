"""The disk tier of the prompt cache: KV blocks that survive restarts and model switches.

A sequence's KV cache is cut into blocks of `block_tokens` tokens. Block i is named by a
chained hash of the tokens up to and including it (`h_i = H(h_{i-1}, tokens_i)`), so a
name identifies the whole prefix, and a new request reads only the blocks of its own
longest cached prefix. Blocks live in a folder per model fingerprint (weights,
quantisation, adapter, tokenizer, cache dtype): a block can never be loaded into another
model. Files are written atomically by a background thread (off the response path) and
carry a checksum; a corrupt or truncated file is discarded and counted, never raised.

Eviction is LRU over *leaf* blocks (blocks no stored block extends), within a byte budget
and a slot count, so shared prefixes such as a system prompt and tool list outlive the
long tails that extend them. Blocks of an active session (`prompt_cache_key`) are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("mlxtg.worker")

_ROOT = b"mlxtg-kv-v1"
SESSION_TTL_S = 30 * 60


def chain_hashes(tokens: list[int], block: int) -> list[str]:
    """Names of the full blocks of `tokens`: each hash covers the whole prefix."""
    out = []
    prev = hashlib.sha256(_ROOT).digest()
    for start in range(0, len(tokens) - block + 1, block):
        chunk = np.asarray(tokens[start : start + block], dtype=np.int64).tobytes()
        prev = hashlib.sha256(prev + chunk).digest()
        out.append(prev.hex()[:32])
    return out


@dataclass(slots=True)
class BlockInfo:
    parent: str | None
    nbytes: int
    last_used: float
    hits: int = 0
    children: int = 0


@dataclass(slots=True)
class DiskStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    blocks_written: int = 0
    blocks_loaded: int = 0
    bytes_written: int = 0
    corrupt: int = 0
    evicted: int = 0
    load_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True)
class _Job:
    tokens: list[int]
    layers: list[tuple[Any, Any]]  # per layer (keys, values) mx arrays, batch 1
    session: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class DiskCache:
    def __init__(
        self,
        root: Path,
        fingerprint: str,
        model_name: str,
        max_bytes: int,
        max_slots: int = 50,
        block_tokens: int = 128,
        min_tokens: int = 128,
    ):
        self.dir = root / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_slots = max_slots
        self.block = block_tokens
        self.min_tokens = min_tokens
        self.stats = DiskStats()
        self.dtype = ""  # the KV dtype as MLX names it, e.g. "mlx.core.float32"
        self._lock = threading.Lock()
        self._blocks: dict[str, BlockInfo] = {}
        self._sessions: dict[str, tuple[float, set[str]]] = {}
        self._evicted: dict[str, None] = {}  # recently evicted blocks, to explain misses
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=64)
        self._meta = {"model": model_name, "fingerprint": fingerprint, "block_tokens": block_tokens}
        (self.dir / "meta.json").write_text(json.dumps(self._meta))
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    # --- index -------------------------------------------------------------------------------

    def _path(self, h: str) -> Path:
        return self.dir / h[:2] / f"{h}.safetensors"

    def _scan(self) -> None:
        """Rebuild the index from the files (the disk is the truth; index.json adds use counts)."""
        saved = {}
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads((self.dir / "index.json").read_text())
        for path in self.dir.glob("*/*.safetensors"):
            h = path.stem
            try:
                meta = _read_meta(path)
            except (OSError, ValueError):
                self.stats.corrupt += 1
                self._discard(path)
                continue
            old = saved.get(h, {})
            self._blocks[h] = BlockInfo(
                parent=meta.get("parent") or None,
                nbytes=path.stat().st_size,
                last_used=float(old.get("last_used", path.stat().st_mtime)),
                hits=int(old.get("hits", 0)),
            )
        for info in self._blocks.values():
            if info.parent is not None and info.parent in self._blocks:
                self._blocks[info.parent].children += 1
        for tmp in self.dir.glob("*/*.tmp*"):
            tmp.unlink(missing_ok=True)

    def save_index(self) -> None:
        with self._lock:
            data = {
                h: {
                    "last_used": b.last_used,
                    "hits": b.hits,
                    "parent": b.parent,
                    "nbytes": b.nbytes,
                }
                for h, b in self._blocks.items()
            }
        # The index only adds use counts to what the files say: failing to write it (folder
        # removed by `mlxtg cache clear` of a stopped server, disk full) must never crash.
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / "index.json.tmp"
            tmp.write_text(json.dumps(data))
            tmp.replace(self.dir / "index.json")
        except OSError as exc:
            log.warning("could not save the KV cache index: %s", exc)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    def slots(self) -> int:
        """Stored conversations: chains ending in a leaf block."""
        return sum(1 for b in self._blocks.values() if b.children == 0)

    # --- lookup ------------------------------------------------------------------------------

    def match(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the disk holds (whole blocks), without loading."""
        n = 0
        with self._lock:
            for h in chain_hashes(tokens, self.block):
                if h not in self._blocks:
                    break
                n += self.block
        return n

    def load(self, tokens: list[int], n_tokens: int) -> list[tuple[Any, Any]] | None:
        """Per-layer (keys, values) mx arrays for the first `n_tokens` (a multiple of the
        block size); None if a block turned out corrupt (it is discarded and counted)."""
        import mlx.core as mx

        started = time.monotonic()
        hashes = chain_hashes(tokens[:n_tokens], self.block)
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
        for h in hashes:
            layers = self._read_block(h)
            if layers is None:
                return None
            parts.append(layers)
        now = time.time()
        with self._lock:
            for h in hashes:
                if h in self._blocks:
                    self._blocks[h].last_used = now
                    self._blocks[h].hits += 1
        out = []
        for layer in range(len(parts[0])):
            k = np.concatenate([p[layer][0] for p in parts], axis=2)
            v = np.concatenate([p[layer][1] for p in parts], axis=2)
            out.append((_restore(mx.array(k), self.dtype), _restore(mx.array(v), self.dtype)))
        self.stats.hits += 1
        self.stats.hit_tokens += n_tokens
        self.stats.blocks_loaded += len(hashes)
        self.stats.load_seconds += time.monotonic() - started
        return out

    def _read_block(self, h: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
        from safetensors.numpy import load_file

        path = self._path(h)
        try:
            tensors = load_file(str(path))
            meta = _read_meta(path)
            if _checksum(tensors) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
            n_layers = int(meta["layers"])
            self.dtype = meta.get("dtype", "")
            return [(tensors[f"{i}.k"], tensors[f"{i}.v"]) for i in range(n_layers)]
        except Exception as exc:  # any damage: drop the block, never crash the worker
            log.warning("discarding corrupt KV block %s: %s", path.name, exc)
            self.stats.corrupt += 1
            with self._lock:
                self._forget(h)
            self._discard(path)
            return None

    def explain_miss(self, tokens: list[int]) -> str | None:
        """Why the disk holds nothing for `tokens`: evicted, or cached for another
        fingerprint of this model (weights, quantisation, adapter or tokenizer changed)."""
        hashes = chain_hashes(tokens[: self.block], self.block)
        if not hashes:
            return "below_minimum"
        first = hashes[0]
        if first in self._evicted:
            return "evicted"
        for sibling in self.dir.parent.glob("*"):
            if sibling == self.dir or not (sibling / first[:2] / f"{first}.safetensors").exists():
                continue
            try:
                meta = json.loads((sibling / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("model") == self._meta["model"]:
                return "fingerprint_mismatch"
        return None

    # --- store -------------------------------------------------------------------------------

    def submit(
        self, tokens: list[int], cache: list[Any], session: str | None = None
    ) -> _Job | None:
        """Queue a finished sequence's cache (batch 1, holding exactly `tokens`) for writing.
        Non-blocking: when the writer is behind, the sequence is simply not stored."""
        full = (len(tokens) // self.block) * self.block
        if full < self.min_tokens or self.max_bytes <= 0:
            return None
        hashes = chain_hashes(tokens[:full], self.block)
        with self._lock:
            if all(h in self._blocks for h in hashes):
                self._touch_session(session, hashes)
                return None
        import mlx.core as mx

        # Slice (and view bfloat16 as uint16, which numpy can hold) on the MLX thread; the
        # writer thread only copies the evaluated buffers.
        self.dtype = str(cache[0].keys.dtype)
        layers = [
            (_storable(c.keys[..., :full, :]), _storable(c.values[..., :full, :])) for c in cache
        ]
        mx.eval(layers)
        job = _Job(tokens[:full], layers, session)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return None
        return job

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._write(job)
            except Exception:
                log.exception("writing KV blocks failed")
            finally:
                job.done.set()

    def _write(self, job: _Job) -> None:
        from safetensors.numpy import save_file

        hashes = chain_hashes(job.tokens, self.block)
        layers = [(np.array(k), np.array(v)) for k, v in job.layers]
        parent = None
        for i, h in enumerate(hashes):
            with self._lock:
                known = h in self._blocks
            if not known:
                a, b = i * self.block, (i + 1) * self.block
                tensors = {}
                for layer, (k, v) in enumerate(layers):
                    tensors[f"{layer}.k"] = np.ascontiguousarray(k[..., a:b, :])
                    tensors[f"{layer}.v"] = np.ascontiguousarray(v[..., a:b, :])
                meta = {
                    "parent": parent or "",
                    "layers": str(len(layers)),
                    "dtype": self.dtype,
                    "checksum": _checksum(tensors),
                }
                path = self._path(h)
                if not path.parent.exists():  # first block in this folder, or after a clear
                    path.parent.mkdir(parents=True, exist_ok=True)
                    (self.dir / "meta.json").write_text(json.dumps(self._meta))
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file(tensors, str(tmp), metadata=meta)
                tmp.replace(path)  # atomic: readers see a whole file or none
                size = path.stat().st_size
                with self._lock:
                    self._blocks[h] = BlockInfo(parent=parent, nbytes=size, last_used=time.time())
                    if parent is not None and parent in self._blocks:
                        self._blocks[parent].children += 1
                self.stats.blocks_written += 1
                self.stats.bytes_written += size
            parent = h
        with self._lock:
            self._touch_session(job.session, hashes)
        self._evict()
        self.save_index()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until queued writes are on disk (tests, shutdown)."""
        marker = _Job([], [])
        self._queue.put(marker)
        marker.done.wait(timeout)

    # --- eviction and sessions ---------------------------------------------------------------

    def _touch_session(self, session: str | None, hashes: list[str]) -> None:
        if session:
            _, held = self._sessions.get(session, (0.0, set()))
            self._sessions[session] = (time.time(), held | set(hashes))

    def touch_session(self, session: str | None, tokens: list[int]) -> None:
        with self._lock:
            self._touch_session(session, chain_hashes(tokens, self.block))

    def _protected(self) -> set[str]:
        now = time.time()
        for key in [k for k, (t, _) in self._sessions.items() if now - t > SESSION_TTL_S]:
            del self._sessions[key]
        return (
            set().union(*(held for _, held in self._sessions.values())) if self._sessions else set()
        )

    def _evict(self) -> None:
        with self._lock:
            protected = self._protected()
            total = sum(b.nbytes for b in self._blocks.values())
            while total > self.max_bytes or self.slots_locked() > self.max_slots:
                leaves = [
                    (b.last_used, h)
                    for h, b in self._blocks.items()
                    if b.children == 0 and h not in protected
                ]
                if not leaves:
                    break
                _, victim = min(leaves)
                total -= self._blocks[victim].nbytes
                self._forget(victim)
                self._evicted[victim] = None
                if len(self._evicted) > 10_000:
                    del self._evicted[next(iter(self._evicted))]
                self._discard(self._path(victim))
                self.stats.evicted += 1

    def slots_locked(self) -> int:
        return sum(1 for b in self._blocks.values() if b.children == 0)

    def _forget(self, h: str) -> None:
        info = self._blocks.pop(h, None)
        if info is not None and info.parent is not None and info.parent in self._blocks:
            self._blocks[info.parent].children -= 1

    @staticmethod
    def _discard(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def clear(self) -> None:
        self.flush()
        with self._lock:
            for h in list(self._blocks):
                self._discard(self._path(h))
            self._blocks.clear()
        self.save_index()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            last = max((b.last_used for b in self._blocks.values()), default=None)
            return {
                "blocks": len(self._blocks),
                "slots": self.slots_locked(),
                "tokens": len(self._blocks) * self.block,
                "bytes": sum(b.nbytes for b in self._blocks.values()),
                "last_used": last,
                "block_hits": sum(b.hits for b in self._blocks.values()),
                **self.stats.as_dict(),
            }


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()[:32]


def _read_meta(path: Path) -> dict[str, str]:
    """The safetensors header's metadata, without reading the tensors."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError("bad header")
        header = json.loads(f.read(size))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return meta


def _storable(x: Any) -> Any:
    import mlx.core as mx

    return x.view(mx.uint16) if x.dtype == mx.bfloat16 else x


def _restore(x: Any, dtype: str) -> Any:
    import mlx.core as mx

    return x.view(mx.bfloat16) if dtype.endswith("bfloat16") else x
