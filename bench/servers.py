"""The one server runner of the benchmarks: mlxtg, mlx_lm.server and (optionally) vllm-mlx.

Every server is started from a Python interpreter (this venv's unless told otherwise) with
the same BLAS: mlx_lm.server and vllm-mlx get OpenBLAS by LD_PRELOAD, mlxtg's supervisor
preloads the same library into its workers itself (`--no-fast-blas` when `blas` is None).
A runner waits for readiness, can be restarted (a new port each start, one log file), stops
its whole process tree, and names that tree's pids for CPU metering and /proc/PID/maps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import OPENBLAS_CANDIDATES, ROOT, env_with_preload, free_port

PY = sys.executable


# -- process trees --------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def stop_tree(proc: subprocess.Popen[Any], sig: int = signal.SIGINT, timeout: float = 30.0) -> int | None:
    """Signal the process, wait, then SIGKILL it and every descendant it had (by pid).

    Descendants are collected before signalling: mlxtg's workers and gateway run in their
    own sessions, so a process-group kill would miss them."""
    kids = set(descendants(proc.pid))
    if proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError):
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
    kids |= set(descendants(proc.pid))
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session=True
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.time() + 10
    for pid in kids:
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return proc.returncode


def blas_from_maps(maps: str) -> str:
    """The BLAS a process's MLX uses, from /proc/PID/maps. numpy maps its own OpenBLAS
    (numpy.libs/libscipy_openblas*) into every process that imports it, so the name
    "openblas" alone proves nothing: look for the system library we preload."""
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line}
    if any(p in OPENBLAS_CANDIDATES or "openblas-pthread" in p for p in libs):
        return "OpenBLAS (preloaded)"
    if any("mlx_cpu.libs" in p or "mlx.libs" in p for p in libs):
        return "mlx bundled BLAS"
    return "?"


def _find_key(obj: Any, key: str) -> dict[str, Any] | None:
    """The first dict inside `obj` (nested dicts and lists) that has `key`."""
    if isinstance(obj, dict):
        if key in obj:
            return obj
        items = list(obj.values())
    elif isinstance(obj, list):
        items = obj
    else:
        return None
    for v in items:
        if (r := _find_key(v, key)) is not None:
            return r
    return None


# -- runners --------------------------------------------------------------------------------------
class Server:
    """One OpenAI-compatible server process. Subclasses say how to launch it (`build`)."""

    name = "server"
    key = "server"  # short id used in result dicts
    ready_path = "/health"

    def __init__(self, model: Path | None, blas: str | None, workdir: Path,
                 max_batch: int | None = None, python: str = PY, log_name: str | None = None,
                 cwd: Path = ROOT):
        self.model, self.blas, self.workdir, self.max_batch = model, blas, workdir, max_batch
        self.python, self.cwd = python, cwd
        self.log_path = workdir / (log_name or f"{self.name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port, self.base = 0, ""
        self.model_field = "default_model"
        self.cmd: list[str] = []
        self.env: dict[str, str] = {}
        self.starts = 0
        self.start_s: list[float] = []  # launch -> ready, per start
        self.launched = 0.0

    def build(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 300.0, poll: float = 0.1) -> float:
        """Launch on a fresh port and wait until `ready_path` answers 200; seconds taken."""
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.build()
        self.starts += 1
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.log_file.write(f"\n==== {time.strftime('%H:%M:%S')} start {self.starts}: {shlex.join(self.cmd)}"
                            f" (MLXTG_HOME={self.env.get('MLXTG_HOME', '-')})\n".encode())
        self.log_file.flush()
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # its gateway or workers may still run
                raise RuntimeError(f"{self.name} exited {code}; log tail:\n{self.tail()}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2.0).status_code == 200:
                    self.after_ready()
                    self.start_s.append(time.perf_counter() - self.launched)
                    return self.start_s[-1]
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log tail:\n{self.tail()}")

    def after_ready(self) -> None:
        pass

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None:
            stop_tree(self.proc, signal.SIGINT, timeout=timeout)
            self.proc = None
        with contextlib.suppress(Exception):
            self.log_file.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """The process tree (root first) for CPU metering."""
        return [self.proc.pid, *descendants(self.proc.pid)] if self.proc else []

    def blas_in_use(self) -> str:
        """Which BLAS the processes of the tree that loaded libmlx have mapped."""
        found = set()
        for pid in self.pids():
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            if "libmlx" in maps:
                found.add(blas_from_maps(maps))
        return ",".join(sorted(found)) or "?"


class Mlxtg(Server):
    """`mlxtg up` with its own MLXTG_HOME (kept across restarts: the disk tier persists)."""

    name = key = "mlxtg"
    ready_path = "/ready"

    def __init__(self, model: Path | None, blas: str | None, workdir: Path, max_batch: int | None = None,
                 home: Path | None = None, config: Path | None = None, extra: list[str] | None = None,
                 **kw: Any):
        # Run outside the checkout, so `python -m mlxtg` imports the installed package (or the
        # one PYTHONPATH names: e.g. a clean worktree while mlxtg/ is mid-edit).
        kw.setdefault("cwd", workdir)
        super().__init__(model, blas, workdir, max_batch, **kw)
        self.home = home or workdir / "mlxtg_home"
        self.config, self.extra = config, list(extra or [])

    def build(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.cmd = [self.python, "-m", "mlxtg", "up", "--port", str(self.port)]
        if self.model is not None:
            self.cmd += ["--model", str(self.model)]
        if self.config is not None:
            self.cmd += ["--config", str(self.config)]
        if self.max_batch:
            self.cmd += ["--max-batch", str(self.max_batch)]
        if not self.blas:
            self.cmd.append("--no-fast-blas")
        self.cmd += self.extra
        self.env = env_with_preload(None)  # the supervisor preloads OpenBLAS into its workers
        self.env["MLXTG_HOME"] = str(self.home)

    def after_ready(self) -> None:
        import httpx

        with contextlib.suppress(Exception):
            self.model_field = httpx.get(self.base + "/v1/models", timeout=5).json()["data"][0]["id"]

    def status(self) -> dict[str, Any]:
        import httpx

        try:
            return dict(httpx.get(self.base + "/admin/status", timeout=10).json())
        except Exception as exc:  # noqa: BLE001
            return {"error": str(exc)}

    def worker(self) -> dict[str, Any]:
        """The first model's worker entry of /admin/status: pid, facts, stats."""
        for m in self.status().get("models") or []:
            if isinstance(m, dict) and m.get("worker"):
                return dict(m["worker"])
        return {}

    def stats(self) -> dict[str, Any]:
        """The worker's stats dict (the one holding prompt_tokens_computed)."""
        return _find_key(self.status(), "prompt_tokens_computed") or {}

    def settled_stats(self, timeout: float = 120.0) -> dict[str, Any]:
        """Stats once the heartbeat has caught up and the disk writer is idle: the same
        counters twice in a row, 1.5 s apart."""
        deadline = time.time() + timeout
        prev = None
        while time.time() < deadline:
            time.sleep(1.5)
            st = self.stats()
            key = (st.get("prompt_tokens_computed"), json.dumps(st.get("disk_cache"), sort_keys=True, default=str))
            if prev is not None and key == prev:
                return st
            prev = key
        return self.stats()

    def evict_all(self) -> None:
        import httpx

        httpx.post(self.base + "/admin/evict", json={"model": None}, timeout=30).raise_for_status()
        time.sleep(0.5)


class MlxLmServer(Server):
    """`mlx_lm.server`; with `max_batch`, decode and prompt concurrency both set to it."""

    name = "mlx_lm.server"
    key = "mlx_lm"

    def __init__(self, *a: Any, log_level: str = "WARNING", **kw: Any):
        super().__init__(*a, **kw)
        self.log_level = log_level

    def build(self) -> None:
        self.cmd = [self.python, "-m", "mlx_lm.server", "--model", str(self.model), "--port", str(self.port),
                    "--log-level", self.log_level]
        if self.max_batch:
            self.cmd += ["--decode-concurrency", str(self.max_batch), "--prompt-concurrency", str(self.max_batch)]
        self.env = env_with_preload(self.blas)


class VllmMlx(Server):
    """`vllm-mlx serve` from its own venv (`python`): not a project dependency."""

    name = "vllm-mlx"
    key = "vllm_mlx"

    def build(self) -> None:
        exe = Path(self.python).with_name("vllm-mlx")
        self.cmd = [str(exe), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.max_batch:
            self.cmd += ["--continuous-batching", "--max-num-seqs", str(self.max_batch)]
        self.env = env_with_preload(self.blas)
        # It persists its prefix cache under ~/.cache/vllm-mlx and reloads it at start: keep
        # that inside this run's work dir.
        self.env["HOME"] = str(self.workdir / "vllm_mlx_home")
        Path(self.env["HOME"]).mkdir(parents=True, exist_ok=True)

    def after_ready(self) -> None:
        import httpx

        with contextlib.suppress(Exception):
            self.model_field = httpx.get(self.base + "/v1/models", timeout=5).json()["data"][0]["id"]
