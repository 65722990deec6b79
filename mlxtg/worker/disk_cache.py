"""The disk tier of the prompt cache: KV blocks that survive restarts and model switches.

A sequence's KV cache is cut into blocks of `block_tokens` tokens. Block i is named by a
chained hash of the tokens up to and including it (`h_i = H(h_{i-1}, tokens_i)`), so a
name identifies the whole prefix, and a new request reads only the blocks of its own
longest cached prefix. Blocks live in a folder per model fingerprint (weights,
quantisation, adapter, tokenizer, cache dtype): a block can never be loaded into another
model. Files are written atomically by a background thread (off the response path) and
carry a checksum; a corrupt or truncated file is discarded and counted, never raised.

A folder that cannot be used (read-only, a file in its place, `meta.json` a directory) turns
the tier off: the worker serves from RAM alone and says why in its stats. A full disk
evicts to make room; failed writes are counted, not raised.

Eviction is LRU over *leaf* blocks (blocks no stored block extends), within a byte budget
and a slot count, so shared prefixes such as a system prompt and tool list outlive the
long tails that extend them. Blocks of an active session (`prompt_cache_key`) are kept.
"""

from __future__ import annotations

import contextlib
import errno
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

from ..kv_files import NotRegularFile, open_regular, read_index, read_json

log = logging.getLogger("mlxtg.worker")

_ROOT = b"mlxtg-kv-v1"
SESSION_TTL_S = 30 * 60
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_REMEMBERED = 10_000  # evicted or corrupt block names kept to explain misses


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
    write_errors: int = 0
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
        self._corrupt: dict[str, None] = {}  # recently discarded blocks, likewise
        self._past: dict[str, int] = {}  # error counters persisted by earlier workers
        self._warned: set[str] = set()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=64)
        self._meta = {"model": model_name, "fingerprint": fingerprint, "block_tokens": block_tokens}
        self._writer: threading.Thread | None = None
        self.disabled: str | None = None  # why the tier is off, or None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_meta()
            self._scan()
        except Exception as exc:  # never fail the model load over the cache folder
            self.disabled = _reason(exc, self.dir)
            self._blocks.clear()
            log.warning("KV disk cache disabled, serving from RAM only: %s", self.disabled)
            return
        if self.stats.corrupt:
            self.save_index()
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    # --- index -------------------------------------------------------------------------------

    def _path(self, h: str) -> Path:
        return self.dir / h[:2] / f"{h}.safetensors"

    def _write_meta(self) -> None:
        """Atomically (temp file + rename), which also proves the folder is writable. A full
        disk is no reason to stop reading what is already there."""
        tmp = self.dir / f"meta.json.tmp{os.getpid()}"
        try:
            _write_bytes(tmp, json.dumps(self._meta).encode())
            tmp.replace(self.dir / "meta.json")
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno not in _NO_SPACE:
                raise
            self._write_failed(exc, "meta.json")

    def _scan(self) -> None:
        """Rebuild the index from the files (the disk is the truth; index.json adds use counts)."""
        saved, self._past = read_index(self.dir)
        for path in self.dir.glob("*/*.safetensors"):
            h = path.stem
            try:
                meta = _read_meta(path)
                size, mtime = path.stat().st_size, path.stat().st_mtime
            except NotRegularFile:
                self._warn("not-a-file", "skipping %s: not a regular file", path)
                continue
            except (OSError, ValueError):
                self._discard_corrupt(h, path)
                continue
            old = saved.get(h, {})
            try:
                last, hits = float(old.get("last_used", mtime)), int(old.get("hits", 0))
            except (TypeError, ValueError):
                last, hits = mtime, 0
            self._blocks[h] = BlockInfo(
                parent=meta.get("parent") or None, nbytes=size, last_used=last, hits=hits
            )
        for info in self._blocks.values():
            if info.parent is not None and info.parent in self._blocks:
                self._blocks[info.parent].children += 1
        for tmp in self.dir.glob("*/*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def save_index(self) -> None:
        if self.disabled:
            return
        with self._lock:
            blocks = {
                h: {
                    "last_used": b.last_used,
                    "hits": b.hits,
                    "parent": b.parent,
                    "nbytes": b.nbytes,
                }
                for h, b in self._blocks.items()
            }
        counters = {
            k: self._past.get(k, 0) + getattr(self.stats, k) for k in ("corrupt", "write_errors")
        }
        # The index only adds use counts to what the files say: failing to write it (folder
        # removed by `mlxtg cache clear` of a stopped server, disk full) must never crash.
        tmp = self.dir / "index.json.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_bytes(tmp, json.dumps({"blocks": blocks, "counters": counters}).encode())
            tmp.replace(self.dir / "index.json")
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._warn(f"index:{exc.errno}", "could not save the KV cache index: %s", exc)

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
        if self.disabled:
            return 0
        n = 0
        with self._lock:
            for h in chain_hashes(tokens, self.block):
                if h not in self._blocks:
                    break
                n += self.block
        return n

    def load(
        self, tokens: list[int], n_tokens: int, at_least: int = 1
    ) -> list[tuple[Any, Any]] | None:
        """Per-layer (keys, values) mx arrays for the first `n_tokens` (a multiple of the
        block size), or for the blocks before the first unreadable one (it is discarded and
        counted); None when that leaves fewer than `at_least` tokens."""
        import mlx.core as mx

        if self.disabled:
            return None
        started = time.monotonic()
        hashes = chain_hashes(tokens[:n_tokens], self.block)
        parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
        for h in hashes:
            layers = self._read_block(h, parts[0] if parts else None)
            if layers is None:
                break
            parts.append(layers)
        if len(parts) * self.block < max(at_least, 1):
            return None
        hashes = hashes[: len(parts)]
        n_tokens = len(parts) * self.block
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

    def _read_block(
        self, h: str, like: list[tuple[np.ndarray, np.ndarray]] | None
    ) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """A block's layers, checked against its checksum and against `like` (the chain's
        first block); None if it is unreadable (discarded and counted when damaged)."""
        from safetensors.numpy import load

        path = self._path(h)
        try:
            with open_regular(path) as f:
                data = f.read()
            tensors = load(data)
            meta = _parse_meta(data)
            if _checksum(tensors) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
            layers = [(tensors[f"{i}.k"], tensors[f"{i}.v"]) for i in range(int(meta["layers"]))]
            if not layers or any(k.shape[2] != self.block for k, _ in layers):
                raise ValueError("wrong block shape")
            if like is not None and [(k.shape, v.shape) for k, v in layers] != [
                (k.shape, v.shape) for k, v in like
            ]:
                raise ValueError("shapes differ from the rest of the chain")
            self.dtype = meta.get("dtype", "")
            return layers
        except NotRegularFile:
            self._warn("not-a-file", "skipping %s: not a regular file", path)
        except FileNotFoundError:  # `mlxtg cache clear` ran
            pass
        except Exception as exc:  # any damage: drop the block, never crash the worker
            log.warning("discarding corrupt KV block %s: %s", path.name, exc)
            self._discard_corrupt(h, path)
        with self._lock:
            self._forget(h)
        return None

    def _discard_corrupt(self, h: str, path: Path) -> None:
        self.stats.corrupt += 1
        _remember(self._corrupt, h)
        self._discard(path)

    def explain_miss(self, tokens: list[int]) -> str | None:
        """Why the disk stops short of `tokens`: the next block was discarded as corrupt or
        evicted, or the prompt was cached for another fingerprint of this model (weights,
        quantisation, adapter or tokenizer changed)."""
        hashes = chain_hashes(tokens, self.block)
        if not hashes:
            return "below_minimum"
        with self._lock:
            missing = next((h for h in hashes if h not in self._blocks), None)
        if missing in self._corrupt:
            return "corrupt"
        if missing in self._evicted:
            return "evicted"
        first = hashes[0]
        if missing != first or self.disabled:
            return None
        for sibling in self.dir.parent.glob("*"):
            if sibling == self.dir or not (sibling / first[:2] / f"{first}.safetensors").exists():
                continue
            try:
                meta = read_json(sibling / "meta.json")
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("model") == self._meta["model"]:
                return "fingerprint_mismatch"
        return None

    # --- store -------------------------------------------------------------------------------

    def submit(
        self, tokens: list[int], cache: list[Any], session: str | None = None
    ) -> _Job | None:
        """Queue a finished sequence's cache (batch 1, holding exactly `tokens`) for writing.
        Non-blocking: when the writer is behind, the sequence is simply not stored."""
        full = (len(tokens) // self.block) * self.block
        if full < self.min_tokens or self.max_bytes <= 0 or self.disabled:
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
                if not self._write_block(h, parent, tensors, meta, keep=hashes[:i]):
                    hashes = hashes[:i]  # the blocks after it would have no parent
                    break
            parent = h
        with self._lock:
            self._touch_session(job.session, hashes)
        self._evict()
        self.save_index()

    def _write_block(
        self,
        h: str,
        parent: str | None,
        tensors: dict[str, np.ndarray],
        meta: dict[str, str],
        keep: list[str],
    ) -> bool:
        """Write one block atomically; on a full disk evict other blocks and try once more.
        False (counted, logged once per kind of error) when it could not be written."""
        from safetensors.numpy import save

        data = save(tensors, metadata=meta)
        path = self._path(h)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        for retry in (False, True):
            try:
                if not path.parent.is_dir():  # first block in this folder, or after a clear
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if not (self.dir / "meta.json").is_file():
                        self._write_meta()
                _write_bytes(tmp, data)
                tmp.replace(path)  # atomic: readers see a whole file or none
                size = path.stat().st_size
                break
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                if not retry and exc.errno in _NO_SPACE and self._make_room(len(data), keep):
                    continue
                self._write_failed(exc, path.name)
                return False
        with self._lock:
            # A block rewritten after a discard may already have children on disk.
            children = sum(1 for b in self._blocks.values() if b.parent == h)
            self._blocks[h] = BlockInfo(parent, size, time.time(), children=children)
            if parent is not None and parent in self._blocks:
                self._blocks[parent].children += 1
        self.stats.blocks_written += 1
        self.stats.bytes_written += size
        return True

    def _write_failed(self, exc: OSError, what: str) -> None:
        self.stats.write_errors += 1
        self._warn(
            f"write:{exc.errno}",
            "could not write %s to the KV disk cache: %s (counted in write_errors; "
            "this kind of failure is not logged again)",
            what,
            exc.strerror or exc,
        )

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        """Log a warning once per kind, so a failing disk does not flood the log."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(msg, *args)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until queued writes are on disk (tests, shutdown)."""
        if self._writer is None:
            return
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
                freed = self._evict_one(protected)
                if not freed:
                    break
                total -= freed

    def _make_room(self, nbytes: int, keep: list[str]) -> bool:
        """The disk is full: evict least recently used blocks (never `keep`, the chain being
        written) until `nbytes` are freed. Whether anything was."""
        with self._lock:
            protected = self._protected() | set(keep)
            freed = 0
            while freed < nbytes:
                one = self._evict_one(protected)
                if not one:
                    break
                freed += one
        return freed > 0

    def _evict_one(self, protected: set[str]) -> int:
        """Evict the least recently used unprotected leaf (lock held); its size, or 0."""
        leaves = [
            (b.last_used, h)
            for h, b in self._blocks.items()
            if b.children == 0 and h not in protected
        ]
        if not leaves:
            return 0
        _, victim = min(leaves)
        size = self._blocks[victim].nbytes
        self._forget(victim)
        _remember(self._evicted, victim)
        self._discard(self._path(victim))
        self.stats.evicted += 1
        return max(size, 1)

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
        if self.disabled:
            return
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
                "disabled": self.disabled,
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
    with open_regular(path) as f:
        head = f.read(8)
        return _parse_meta(head + f.read(_header_size(head)))


def _header_size(head: bytes) -> int:
    size = int.from_bytes(head[:8], "little")
    if len(head) < 8 or not 0 < size < 100_000_000:
        raise ValueError("bad header")
    return size


def _parse_meta(data: bytes) -> dict[str, str]:
    """The metadata in the header at the start of a safetensors file's bytes."""
    size = _header_size(data)
    header = json.loads(data[8 : 8 + size])
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return meta


def _write_bytes(path: Path, data: bytes) -> None:
    """The one place the disk tier writes file contents (tests make it fail)."""
    with path.open("wb") as f:
        f.write(data)


def _remember(seen: dict[str, None], h: str) -> None:
    seen[h] = None
    if len(seen) > _REMEMBERED:
        del seen[next(iter(seen))]


def _reason(exc: BaseException, where: Path | str = "") -> str:
    """`strerror: path` for an OSError, else the message, prefixed with `where`."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename2 or exc.filename}"
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return f"{where}: {text}" if where else text


def _storable(x: Any) -> Any:
    import mlx.core as mx

    return x.view(mx.uint16) if x.dtype == mx.bfloat16 else x


def _restore(x: Any, dtype: str) -> Any:
    import mlx.core as mx

    return x.view(mx.bfloat16) if dtype.endswith("bfloat16") else x
