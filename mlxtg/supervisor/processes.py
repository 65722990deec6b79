"""Child processes of the supervisor: one worker per resident model, and the gateway."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..blas import find_fast_blas
from ..models import ModelSpec
from ..protocol import Config, EngineSettings
from ..quant import BITS
from .config import ServerSettings
from .load_progress import LoadProgress
from .ranks import spawn_group

log = logging.getLogger("mlxtg.supervisor")


class WorkerState(StrEnum):
    STARTING = "starting"  # process spawned, no HELLO yet
    LOADING = "loading"  # CONFIG sent, loading weights
    READY = "ready"
    DRAINING = "draining"  # evicting: no new requests, exits when idle
    STOPPED = "stopped"


@dataclass(slots=True)
class WorkerHandle:
    worker_id: str
    spec: ModelSpec
    proc: subprocess.Popen[bytes]
    state: WorkerState = WorkerState.STARTING
    spawned_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    progress: LoadProgress | None = field(default_factory=LoadProgress)  # None once loaded

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def loading(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.LOADING)

    def describe(self, inflight: int = 0) -> dict[str, Any]:
        ranks = getattr(self.proc, "pids", None)  # a distributed model: one pid per rank
        return {
            "model": self.name,
            "worker_id": self.worker_id,
            "pid": self.proc.pid,
            **({"rank_pids": ranks} if ranks else {}),
            "state": str(self.state),
            "rss_bytes": rss_bytes(self.proc.pid),
            "inflight": inflight,
            "uptime": time.time() - self.spawned_at,
            "facts": self.facts,
            "stats": self.stats,
        }


def worker_config(handle: WorkerHandle, settings: ServerSettings) -> Config:
    """The CONFIG a worker loads: its model, and the engine settings (the model's own cache
    budgets where it sets them, else the server's)."""
    spec, gb = handle.spec, 1 << 30

    def pick(own: Any, default: Any) -> Any:
        return own if own is not None else default

    engine = EngineSettings(
        max_batch=settings.max_batch,
        max_queued=settings.max_queued,
        prefill_chunk=settings.prefill_chunk,
        idle_prefill_chunk=settings.idle_prefill_chunk,
        batched_prefill=settings.batched_prefill,
        cache_ram_bytes=int(pick(spec.cache_ram_gb, settings.cache_ram_gb) * gb),
        cache_min_tokens=pick(spec.cache_min_tokens, settings.cache_min_tokens),
        cache_disk_bytes=int(pick(spec.cache_disk_gb, settings.cache_disk_gb) * gb),
        cache_slots=pick(spec.cache_slots, settings.cache_slots),
    )
    return Config(worker_id=handle.worker_id, model=spec.to_wire(), engine=engine)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, or None when it is gone."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # the process may be gone already
        return None


def weights_bytes(spec: ModelSpec) -> int:
    """On-disk size of a local model's weights (0 when unknown, e.g. not downloaded yet)."""
    from pathlib import Path

    folder = Path(spec.model_id_or_path).expanduser()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    bits = BITS.get(spec.quant)
    return size * bits // 16 if bits else size  # quantised from (usually) 16-bit weights


@dataclass(slots=True)
class Spare:
    """A standby worker: started, imports done, waiting for a CONFIG (after its HELLO)."""

    worker_id: str
    proc: subprocess.Popen[bytes]
    ready: bool = False


def _worker_env(fast_blas: bool) -> dict[str, str]:
    env = dict(os.environ)
    blas = find_fast_blas() if fast_blas else None
    if blas:
        env["LD_PRELOAD"] = ":".join(p for p in (blas, env.get("LD_PRELOAD")) if p)
    return env


def _spawn(worker_id: str, endpoint: str, fast_blas: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "mlxtg.worker", "--endpoint", endpoint, "--worker-id", worker_id]
    # Own session: a Ctrl-C in the terminal reaches the supervisor only, which stops us.
    return subprocess.Popen(cmd, env=_worker_env(fast_blas), start_new_session=True)


def spawn_worker(spec: ModelSpec, worker_id: str, endpoint: str, fast_blas: bool) -> WorkerHandle:
    """One process, or for a distributed model one per rank (ranks.py), as one worker."""
    proc: Any
    if spec.distributed is not None:
        args = ["--endpoint", endpoint, "--worker-id", worker_id]
        proc = spawn_group(spec.distributed.to_wire(), args, _worker_env(fast_blas))
        log.info(
            "spawned worker %s (pids %s, %s split) for model %s",
            worker_id,
            proc.pids,
            spec.distributed.split,
            spec.name,
        )
    else:
        proc = _spawn(worker_id, endpoint, fast_blas)
        log.info("spawned worker %s (pid %d) for model %s", worker_id, proc.pid, spec.name)
    return WorkerHandle(worker_id=worker_id, spec=spec, proc=proc)


def spawn_spare(worker_id: str, endpoint: str, fast_blas: bool) -> Spare:
    return Spare(worker_id=worker_id, proc=_spawn(worker_id, endpoint, fast_blas))


def spawn_gateway(
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """The gateway reads its settings (API keys included) from the environment, so
    keys never show up in `ps`."""
    full_env = {**os.environ, **(env or {}), "MLXTG_GATEWAY_CONFIG": json.dumps(config)}
    return subprocess.Popen(
        [sys.executable, "-m", "mlxtg.gateway"],
        env=full_env,
        start_new_session=True,
        pass_fds=pass_fds,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: no orphans. Blocks up to twice `timeout`: for shutdown
    only; a running supervisor stops workers through the pool, which never waits."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)
    except ProcessLookupError:
        return proc.poll()
