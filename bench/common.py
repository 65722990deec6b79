"""Helpers shared by the benchmarks: paths, machine facts, CPU metering on a shared machine.

Nothing here imports MLX at module level, so a benchmark's parent process stays light. Server
runners live in `bench.servers`, the random-model builder in `bench.models`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlxtg.blas import OPENBLAS_CANDIDATES, find_fast_blas  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
DEMO_MODEL = ROOT / "mlxtg" / "demo" / "model"


def find_openblas() -> str | None:
    """The OpenBLAS the mlxtg supervisor would preload (same lookup, so both servers match)."""
    return find_fast_blas()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env_with_preload(blas: str | None = None) -> dict[str, str]:
    """This environment with LD_PRELOAD set to exactly `blas` (or removed)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if blas:
        env["LD_PRELOAD"] = blas
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# -- machine facts --------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    mlx_ver = _version("mlx")
    try:
        mlx_cpu = _version("mlx-cpu")
        if mlx_cpu != "not installed":
            mlx_ver += f" (mlx-cpu {mlx_cpu})"
    except Exception:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1) if ram_gb else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "mlx": mlx_ver,
        "mlx_lm": _version("mlx-lm"),
        "mlxtg": _version("mlxtg"),
        "openblas": find_openblas(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def busy_processes(min_cpu: float = 20.0, exclude: set[int] | None = None) -> list[str]:
    """Other processes using the CPU right now (the benchmark shares the machine)."""
    try:
        import psutil
    except ImportError:
        return []
    exclude = exclude or set()
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in exclude]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(1.0)
    out = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= min_cpu:
            cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])[:90]
            out.append(f"{cpu:.0f}% pid {p.pid} {cmd}")
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- CPU accounting (the machine is shared) -------------------------------------------------------
def _busy_jiffies() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts) - idle, sum(parts)


def _tree_cpu(pids: list[int]) -> float:
    import psutil

    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in procs:
            if q.pid in seen:
                continue
            seen.add(q.pid)
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def others_cores(our_pids: list[int], seconds: float) -> float:
    """Cores used by everything except these process trees and this process, over `seconds`."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, ours0, me0 = _busy_jiffies()[0], _tree_cpu(our_pids), sum(os.times()[:2])
    time.sleep(seconds)
    busy = (_busy_jiffies()[0] - b0) / hz
    ours = _tree_cpu(our_pids) - ours0 + sum(os.times()[:2]) - me0
    return max(busy - ours, 0.0) / seconds


class Quiet:
    """Before each measurement, wait (within a per-run budget) until other people's jobs
    use less than `threshold` cores: the machine is shared and has few cores."""

    def __init__(self, threshold: float, per_wait: float, budget: float):
        self.threshold, self.per_wait, self.budget = threshold, per_wait, budget
        self.waited = 0.0

    def wait(self, our_pids: list[int]) -> float:
        t0 = time.perf_counter()
        other = others_cores(our_pids, 0.5)
        said = False
        while (other > self.threshold and time.perf_counter() - t0 < self.per_wait
               and self.waited + time.perf_counter() - t0 < self.budget):
            if not said:
                log(f"  other jobs use {other:.2f} cores; waiting up to {self.per_wait:.0f}s for quiet")
                said = True
            other = others_cores(our_pids, 2.0)
        self.waited += time.perf_counter() - t0
        return other


class CpuMeter:
    """How many cores the system under test used during a measurement, and how many
    everything else on the machine used (the benchmark client excluded from both)."""

    def __init__(self, target_pids: list[int]):
        self.pids = target_pids
        self.hz = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.busy0, _ = _busy_jiffies()
        self.tgt0 = _tree_cpu(self.pids)
        self.me0 = sum(os.times()[:2])
        return self

    def __exit__(self, *exc: Any) -> None:
        el = max(time.perf_counter() - self.t0, 1e-9)
        busy = (_busy_jiffies()[0] - self.busy0) / self.hz
        tgt = _tree_cpu(self.pids) - self.tgt0
        me = sum(os.times()[:2]) - self.me0
        self.target_cores = tgt / el
        self.client_cores = me / el
        self.other_cores = max(busy - tgt - me, 0.0) / el


# -- waiting for other benchmarks -----------------------------------------------------------------
# Other servers / benchmarks: wait for them. A training only adds load: noted, not waited for.
OTHERS = (
    "mlxtg up",
    "mlx_lm.server",
    "mlxtg.worker",
    "bench_serving",
    "build-llama",
    "mlxtg.gateway",
)
LOAD_ONLY = ("mlxtg.demo.train", "pytest")


def others_running(load_too: bool = False) -> list[str]:
    """Other benchmarks' servers and trainings (not this process's own children)."""
    import psutil

    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in mine:
            continue
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(o in cmd for o in (*OTHERS, *(LOAD_ONLY if load_too else ()))) and (
            "bench_agent" not in cmd
        ):
            out.append(f"pid {p.info['pid']}: {cmd[:110]}")
    return out


def wait_quiet(limit: float) -> list[str]:
    """Wait (up to `limit` s) until no other server / training runs; returns what still runs."""
    deadline = time.time() + limit
    said = False
    while True:
        busy = others_running()
        if not busy or time.time() > deadline:
            return busy
        if not said:
            log(f"waiting up to {limit:.0f}s for other runs to finish:\n  " + "\n  ".join(busy))
            said = True
        time.sleep(15)


# -- reports --------------------------------------------------------------------------------------
def git_commit() -> str:
    """The checkout's short commit, with "+dirty" when mlxtg/ has uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "mlxtg") else "")


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the `## ` section that starts with `heading` in a markdown file (or append it),
    leaving the rest of the file alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")


def export_head(dest: Path) -> str:
    """Write HEAD's mlxtg/ (no uncommitted edits) under `dest`, for PYTHONPATH; its short commit."""
    import subprocess

    dest.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    tar = subprocess.run(["git", "archive", commit, "mlxtg"], cwd=ROOT, capture_output=True,
                         check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return commit
