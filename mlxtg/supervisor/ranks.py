"""The processes of a distributed model: one per rank, started and stopped as one worker.

The supervisor starts every rank itself with the environment contract of `mlx.launch`
(MLX_RANK, and MLX_HOSTFILE naming a JSON list of each rank's ring address): local ranks as
children, remote ones through `ssh -tt` (hanging up the ssh session ends the remote rank).
Rank 0 must run here: it is the one that talks to the supervisor.

`RankGroup` stands in for the worker's `Popen` everywhere the supervisor holds one: a
signal goes to every rank, and the group has exited only when every rank has. When one rank
exits, `poll` kills the others, so the supervisor sees the worker die, fails its requests and
respawns the whole group, and no rank is left running alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..hosts import is_local
from ..protocol.specs import DistributedLoad
from .process_group import ProcessGroup

log = logging.getLogger("mlxtg.supervisor")

# The worker's own variables that other hosts need too (the rest of the environment stays).
FORWARDED_ENV = ("MLXTG_LOG_LEVEL", "MLXTG_HOME", "HF_HOME", "HF_HUB_OFFLINE")


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def ring_addresses(dist: DistributedLoad) -> list[str]:
    """Each rank's `ip:port`: consecutive ports from `dist.port`, or free ones (all local)."""
    if dist.port:
        return [f"{h.ip}:{dist.port + rank}" for rank, h in enumerate(dist.hosts)]
    if not all(is_local(h.ip) for h in dist.hosts):
        raise ValueError("distributed.port is required when ranks run on other hosts")
    return [f"{h.ip}:{_free_port(h.ip)}" for h in dist.hosts]


class RankGroup(ProcessGroup):
    """The ranks of one distributed worker, shaped like the `Popen` of a single one."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], hostfile: Path):
        super().__init__(procs)
        self.hostfile = hostfile

    def poll(self) -> int | None:
        codes = [p.poll() for p in self.procs]
        if all(c is None for c in codes):
            return None
        if any(c is None for c in codes):
            # One rank is gone: the others would wait on it forever. Take them all down.
            self.kill()
            return None  # exited once the others have been reaped (next poll)
        self.returncode = next((c for c in codes if c), codes[0])
        with contextlib.suppress(OSError):
            self.hostfile.unlink()
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.procs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            p.wait(timeout=left)
        code = self.poll()
        assert code is not None
        return code


def spawn_group(dist: DistributedLoad, worker_args: list[str], env: dict[str, str]) -> RankGroup:
    """Start every rank of `dist` running `python -m mlxtg.worker WORKER_ARGS`."""
    if not is_local(dist.hosts[0].ip):
        raise ValueError(
            f"rank 0 must run on this machine, but {dist.hosts[0].ip} is not one of its addresses"
        )
    if dist.backend != "ring":
        raise ValueError(f"backend {dist.backend!r} is not supported; use ring")
    ring = json.dumps([[address] for address in ring_addresses(dist)])
    fd, name = tempfile.mkstemp(prefix="mlxtg-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(ring)
    local = [r == 0 or (is_local(h.ip) and is_local(h.ssh)) for r, h in enumerate(dist.hosts)]
    local_env = dict(env)
    if "OPENBLAS_NUM_THREADS" not in env:
        # Ranks sharing this machine split its cores. OpenBLAS threads spin after each call,
        # and a rank whose peer is spinning waits out a scheduler slice at every collective:
        # on 2 cores, 2 ranks of the demo model ran 5x slower with OpenBLAS's default.
        threads = max(1, (os.cpu_count() or 1) // sum(local))
        local_env["OPENBLAS_NUM_THREADS"] = str(threads)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank, host in enumerate(dist.hosts):
            rank_env = {"MLX_RANK": str(rank), "MLX_HOSTFILE": name}
            if local[rank]:
                cmd = [sys.executable, "-m", "mlxtg.worker", *worker_args]
                rank_proc = subprocess.Popen(
                    cmd, env={**local_env, **rank_env}, start_new_session=True
                )
                procs.append(rank_proc)
            else:
                procs.append(_spawn_remote(host.ssh, dist.python, ring, rank, worker_args, env))
    except Exception:
        RankGroup(procs, Path(name)).kill()
        Path(name).unlink(missing_ok=True)
        raise
    return RankGroup(procs, Path(name))


def _spawn_remote(
    ssh: str,
    python: str | None,
    ring: str,
    rank: int,
    worker_args: list[str],
    env: dict[str, str],
) -> subprocess.Popen[bytes]:
    """A rank on another host, the way mlx.launch starts one: a shell that writes the
    hostfile, exports the rank, and execs the worker."""
    exports = " ".join(f"export {k}={shlex.quote(env[k])};" for k in FORWARDED_ENV if env.get(k))
    command = shlex.join([python or sys.executable, "-m", "mlxtg.worker", *worker_args])
    script = (
        f"f=$(mktemp); echo {shlex.quote(ring)} > $f; export MLX_HOSTFILE=$f; "
        f"export MLX_RANK={rank}; {exports} exec {command}"
    )
    # LogLevel=ERROR: quiet, but why ssh failed (auth, host key) still reaches the log.
    cmd = ["ssh", "-tt", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", ssh, script]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
