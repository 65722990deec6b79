"""Serving benchmark: mlxtg vs mlx_lm.server vs mlx-lm's in-process BatchGenerator (the ceiling).

    python -m bench.bench_serving                       # the full run (~15 min on 2 cores)
    python -m bench.bench_serving --quick               # demo model, c = 1 and 4, 16 tokens, no files
    python -m bench.bench_serving --models demo,big --concurrency 1,4,16,32 --max-tokens 64

For each model, with OpenBLAS preloaded into every process that runs MLX, and for each
concurrency c: c concurrent streaming chat completions (distinct prompts, temperature 0, EOS
banned with logit_bias so every request generates exactly max_tokens) against mlxtg, then
mlx_lm.server, and the same token ids through mlx-lm's BatchGenerator in a subprocess at
batch c. Both servers and the ceiling process stay up for the whole model and are measured
level by level, one after the other, so background load on a shared machine hits all three
alike. Then a reduced run without OpenBLAS (demo model, c = 1 and 16).

Writes `bench/RESULTS.md` (its own section only) and `bench/serving.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_serving.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import (  # noqa: E402
    DEMO_MODEL,
    OPENBLAS_CANDIDATES,
    OUT,
    ROOT,
    busy_processes,
    env_without_preload,
    find_openblas,
    free_port,
    loadavg,
    machine_info,
    model_ready,
    stop_tree,
    wait_for_model,
)

HEADING = "## Serving throughput and latency (issue: continuous batching)"
PY = sys.executable
BIG_DIMS = {"hidden": 1024, "layers": 12, "intermediate": 2816, "heads": 16}

# Words the demo model's tokenizer has as single tokens (its BPE saw only its own corpus).
WORDS = {
    "city": ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Madrid", "Berlin", "Denver", "Sydney", "Toronto", "Dublin", "Rome", "Vienna", "Prague", "Lisbon", "Seoul"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "cat": ["fruits", "animals", "colors", "vegetables", "sports", "planets", "instruments"],
    "color": ["blue", "green", "yellow", "purple", "orange", "white", "brown", "pink"],
    "fruit": ["apple", "banana", "cherry", "mango", "lemon", "grape", "peach", "melon"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- prompts --------------------------------------------------------------------------------------
def make_prompt(tag: str, idx: int) -> tuple[str, str]:
    """A distinct ~45-token request (chat template included), as (system, user).

    A per-prompt number opens the system message, so prompts share only the few template
    tokens before it: no server gets a prefix-cache hit the in-process ceiling cannot have.
    Nothing asks about the weather, which the demo model answers with a tool call."""
    import random
    import zlib

    r = random.Random(f"{tag}/{idx}")
    n = zlib.crc32(f"{tag}/{idx}".encode()) % 900000 + 100000
    w = {k: r.choice(v) for k, v in WORDS.items()}
    return (f"Note {n}. You are a helpful assistant.",
            f"List three {w['cat']}, name a {w['color']} {w['fruit']}, and tell me "
            f"about {w['city']} on {w['day']}.")


def messages(tag: str, idx: int) -> list[dict[str, str]]:
    system, user = make_prompt(tag, idx)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


BANNED_TAGS = ("<tool_call>", "<tool_response>")  # keep both servers' tool-call parsers idle


def eos_ids(model: Path) -> list[int]:
    """Every id either config.json, generation_config.json or the tokenizer calls EOS, plus
    tool-call tags: banned with logit_bias so every stream is plain content to max_tokens."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        p = model / name
        if p.exists():
            v = json.loads(p.read_text()).get("eos_token_id")
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, list):
                ids.update(int(x) for x in v)
    tc = model / "tokenizer_config.json"
    tj = model / "tokenizer.json"
    if tc.exists() and tj.exists():
        eos = json.loads(tc.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            if t["content"] == eos or t["content"] in BANNED_TAGS:
                ids.add(int(t["id"]))
    return sorted(ids)


# -- streaming client -----------------------------------------------------------------------------
@dataclass
class StreamResult:
    ok: bool = False
    error: str | None = None
    t_send: float = 0.0
    t_first_chunk: float | None = None  # first SSE data event of any kind
    t_first: float | None = None  # first chunk with non-empty content
    t_last: float | None = None  # last chunk with content
    content_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # from usage
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text_len: int = 0
    retries: int = 0  # connection failures before any response byte, retried at once
    exc: Exception | None = None


async def stream_one(client: Any, url: str, body: dict[str, Any], timeout: float) -> StreamResult:
    """One streamed request. A connection dropped before any response byte is retried (up to
    3 times, as the OpenAI SDK would); TTFT still counts from the first attempt."""
    import httpx

    t_send = time.perf_counter()
    for attempt in range(4):
        res = await _stream_once(client, url, body, timeout)
        res.t_send, res.retries = t_send, attempt
        if res.ok or not isinstance(res.exc, httpx.TransportError) or res.t_first_chunk is not None:
            break
    return res


async def _stream_once(client: Any, url: str, body: dict[str, Any], timeout: float) -> StreamResult:
    res = StreamResult()
    res.t_send = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    res.error = f"HTTP {resp.status_code}: {text[:500]}"
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    now = time.perf_counter()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        res.error = f"error event: {json.dumps(obj)[:500]}"
                        return res
                    if res.t_first_chunk is None:
                        res.t_first_chunk = now
                    if obj.get("usage"):
                        res.completion_tokens = obj["usage"].get("completion_tokens")
                        res.prompt_tokens = obj["usage"].get("prompt_tokens")
                    for ch in obj.get("choices") or []:
                        content = (ch.get("delta") or {}).get("content")
                        if content:
                            res.content_times.append(now)
                            res.text_len += len(content)
                            if res.t_first is None:
                                res.t_first = now
                            res.t_last = now
                        if ch.get("finish_reason"):
                            res.finish_reason = ch["finish_reason"]
        res.ok = res.t_first is not None
        if not res.ok:
            res.error = "stream ended without content"
    except TimeoutError:
        res.error = f"timed out after {timeout:.0f}s"
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        res.error = f"{type(exc).__name__}: {exc}"
        res.exc = exc
    return res


async def fire(
    base: str, bodies: list[dict[str, Any]], timeout: float
) -> tuple[float, list[StreamResult]]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_one(client, base + "/v1/chat/completions", b, timeout) for b in bodies)
        )
    return t0, list(results)


def request_body(model_field: str, msgs: list[dict[str, str]], max_tokens: int, eos: list[int]) -> dict[str, Any]:
    return {
        "model": model_field,
        "messages": msgs,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(i): -100 for i in eos},
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(t0: float, results: list[StreamResult], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    toks = [r.completion_tokens if r.completion_tokens is not None else len(r.content_times) for r in ok]
    wrong = [
        (i, t) for i, t in enumerate(toks) if t != max_tokens
    ]
    total = sum(toks)
    t_end = max((r.t_last for r in ok if r.t_last), default=t0)
    wall = max(t_end - t0, 1e-9)
    ttft = [(r.t_first - r.t_send) * 1e3 for r in ok if r.t_first]
    first_chunk = [(r.t_first_chunk - r.t_send) * 1e3 for r in ok if r.t_first_chunk]
    per_stream = []
    itl = []
    gaps: list[float] = []
    for r, n in zip(ok, toks, strict=True):
        if r.t_first and r.t_last and n > 1 and r.t_last > r.t_first:
            per_stream.append((n - 1) / (r.t_last - r.t_first))
            itl.append((r.t_last - r.t_first) / (n - 1) * 1e3)
        gaps += [(b - a) * 1e3 for a, b in zip(r.content_times, r.content_times[1:], strict=False)]
    raw = [
        [round((r.t_send - t0) * 1e3, 1),
         round((r.t_first - t0) * 1e3, 1) if r.t_first else None,
         round((r.t_last - t0) * 1e3, 1) if r.t_last else None,
         len(r.content_times)]
        for r in results
    ]
    return {
        "raw_send_first_last_chunks_ms": raw,
        "retries": sum(r.retries for r in results),
        "n": len(results),
        "ok": len(ok),
        "errors": errors[:5],
        "n_errors": len(errors),
        "total_tokens": total,
        "wrong_counts": wrong[:5],
        "n_wrong": len(wrong),
        "chunks_per_token": (sum(len(r.content_times) for r in ok) / total) if total else None,
        "prompt_tokens": [r.prompt_tokens for r in ok],
        "wall_s": wall,
        "agg_tps": total / wall,
        "per_stream_tps": statistics.mean(per_stream) if per_stream else float("nan"),
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p95": pct(ttft, 0.95),
        "first_chunk_p50": pct(first_chunk, 0.5),
        "itl_ms": statistics.median(itl) if itl else float("nan"),
        "gap_p50_ms": pct(gaps, 0.5),
        "gap_p95_ms": pct(gaps, 0.95),
        "gap_max_ms": max(gaps) if gaps else float("nan"),
    }


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


# -- servers --------------------------------------------------------------------------------------
def blas_from_maps(maps: str) -> str:
    """The BLAS a process's MLX uses, from /proc/PID/maps. numpy maps its own OpenBLAS
    (numpy.libs/libscipy_openblas*) into every process that imports it, so the name
    "openblas" alone proves nothing: look for the system library we preload."""
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line}
    preload = [p for p in libs if p in OPENBLAS_CANDIDATES or "openblas-pthread" in p]
    if preload:
        return "OpenBLAS (preloaded)"
    if any("mlx_cpu.libs" in p or "mlx.libs" in p for p in libs):
        return "mlx bundled BLAS"
    return "?"


class Server:
    name = "server"

    def __init__(self, model: Path, blas: str | None, workdir: Path, max_batch: int):
        self.model = model
        self.blas = blas
        self.workdir = workdir
        self.max_batch = max_batch
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.model_field = ""
        self.cmd: list[str] = []
        self.env: dict[str, str] = {}

    def start(self, timeout: float) -> None:
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        import httpx

        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            try:
                r = httpx.get(self.base + self.ready_path, timeout=2.0)
                if r.status_code == 200:
                    self.after_ready()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log tail:\n{self.tail()}")

    ready_path = "/health"

    def after_ready(self) -> None:
        pass

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc, signal.SIGINT, timeout=30)
            self.proc = None
        with contextlib.suppress(Exception):
            self.log_file.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def blas_in_use(self) -> str:
        """Which BLAS the process(es) that loaded libmlx have mapped."""
        import psutil

        found = []
        if not self.proc:
            return "?"
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.Error:
            return "?"
        for p in procs:
            try:
                maps = Path(f"/proc/{p.pid}/maps").read_text()
            except OSError:
                continue
            if "libmlx" in maps:
                found.append(blas_from_maps(maps))
        return ",".join(sorted(set(found))) or "?"


class Mlxtg(Server):
    name = "mlxtg"
    ready_path = "/ready"

    def __init__(self, model: Path, blas: str | None, workdir: Path, max_batch: int):
        super().__init__(model, blas, workdir, max_batch)
        self.home = workdir / "mlxtg_home"
        self.home.mkdir(parents=True, exist_ok=True)
        exe = Path(PY).with_name("mlxtg")
        base = [str(exe)] if exe.exists() else [PY, "-m", "mlxtg"]
        self.cmd = [*base, "up", "--model", str(model), "--port", str(self.port),
                    "--max-batch", str(max_batch)]
        if not blas:
            self.cmd.append("--no-fast-blas")
        self.env = env_without_preload(None)  # the supervisor adds the preload to workers itself
        self.env["MLXTG_HOME"] = str(self.home)

    def after_ready(self) -> None:
        import httpx

        models = httpx.get(self.base + "/v1/models", timeout=5).json()
        self.model_field = models["data"][0]["id"]

    def status(self) -> dict[str, Any]:
        import httpx

        try:
            return httpx.get(self.base + "/admin/status", timeout=5).json()
        except Exception as exc:  # noqa: BLE001
            return {"error": str(exc)}

    def worker_stats(self) -> dict[str, Any]:
        """The first model's worker entry of /admin/status: pid, facts, stats."""
        st = self.status()
        for m in st.get("models") or []:
            if isinstance(m, dict) and m.get("worker"):
                return dict(m["worker"])
        return {}

    def home_logs(self) -> list[Path]:
        return sorted(p for p in self.home.rglob("*") if p.is_file() and p.suffix in (".log", ".txt"))


class MlxLmServer(Server):
    name = "mlx_lm.server"

    def __init__(self, model: Path, blas: str | None, workdir: Path, max_batch: int):
        super().__init__(model, blas, workdir, max_batch)
        self.cmd = [PY, "-m", "mlx_lm.server", "--model", str(model), "--port", str(self.port),
                    "--decode-concurrency", str(max_batch), "--prompt-concurrency", str(max_batch),
                    "--log-level", "WARNING"]
        self.env = env_without_preload(blas)
        self.model_field = "default_model"


class Ceiling:
    """mlx-lm's BatchGenerator in a subprocess (same BLAS preload), driven line by line."""

    name = "ceiling"

    def __init__(self, model: Path, blas: str | None, workdir: Path):
        self.model = model
        self.blas = blas
        self.err_path = workdir / "ceiling.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float) -> dict[str, Any]:
        self.err = open(self.err_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "bench.bench_serving", "--ceiling-worker", str(self.model)],
            cwd=ROOT,
            env=env_without_preload(self.blas),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        return self._read(timeout)

    def call(self, timeout: float, **cmd: Any) -> dict[str, Any]:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc and self.proc.stdout
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"ceiling worker gave no answer in {timeout:.0f}s")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if not r:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ceiling worker exited {self.proc.returncode}: {self.tail()}")
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"ceiling worker closed its output: {self.tail()}")
            if line.startswith("RESULT "):
                out = json.loads(line[7:])
                if "error" in out:
                    raise RuntimeError(f"ceiling worker: {out['error']}")
                return out

    def tail(self) -> str:
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            stop_tree(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None
        with contextlib.suppress(Exception):
            self.err.close()


def ceiling_worker(model_path: str) -> None:
    """The subprocess side of `Ceiling`: JSON commands in, `RESULT {...}` lines out."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    def send(obj: dict[str, Any]) -> None:
        sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        blas = blas_from_maps(Path(f"/proc/{os.getpid()}/maps").read_text())
    except OSError:
        blas = "?"
    a = mx.random.normal((1024, 1024))
    mx.eval(a)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a @ a)
        ts.append(time.perf_counter() - t)
    gflops = 2 * 1024**3 / min(ts) / 1e9
    t = time.perf_counter()
    loaded = load(model_path)
    model, tok = loaded[0], loaded[1]
    load_s = time.perf_counter() - t
    send({"blas": blas, "matmul_gflops": gflops, "load_s": load_s})

    def ids_of(msgs: list[dict[str, str]]) -> list[int]:
        out = tok.apply_chat_template(msgs, add_generation_prompt=True)
        if not isinstance(out, list):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def batch(prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        c = len(prompts)
        gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=None,
                             completion_batch_size=c, prefill_batch_size=c)
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        count: dict[int, int] = {}
        t0 = time.perf_counter()
        gen.insert(prompts, [max_tokens] * c)
        with gen.stats() as st:
            while resps := gen.next_generated():
                now = time.perf_counter()
                for r in resps:
                    first.setdefault(r.uid, now)
                    last[r.uid] = now
                    count[r.uid] = count.get(r.uid, 0) + 1
        gen.close()
        total = sum(count.values())
        t_first, t_last = min(first.values()), max(last.values())
        return {
            "c": c,
            "total_tokens": total,
            "counts_ok": all(v == max_tokens for v in count.values()) and len(count) == c,
            "wall_s": t_last - t0,
            "agg_tps": total / (t_last - t0),
            "ttft_ms": (t_first - t0) * 1e3,
            "decode_tps": (total - c) / (t_last - t_first) if t_last > t_first else float("nan"),
            "step_ms": (t_last - t_first) / max(max_tokens - 1, 1) * 1e3,
            "stats_decode_tps": st.decode_tps,
            "stats_prompt_time": st.prompt_time,
            "stats_steps": st.generation_steps,
            "prompt_tokens": [len(p) for p in prompts],
        }

    def single(prompt: list[int], steps: int, reps: int) -> dict[str, Any]:
        """What mlxtg's c = 1 path costs with no server around it: prefill (batch 1, one
        forward, argmax of the last logits) and a synchronous decode step (forward + argmax)."""
        pre = []
        step_times: list[float] = []
        for _ in range(reps):
            cache = make_prompt_cache(model)
            t = time.perf_counter()
            logits = model(mx.array(prompt)[None], cache=cache)
            tok_ = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(tok_)
            pre.append(time.perf_counter() - t)
            y = tok_
            for _ in range(steps):
                t = time.perf_counter()
                logits = model(y[:, None], cache=cache)
                y = mx.argmax(logits[:, -1, :], axis=-1)
                mx.eval(y)
                step_times.append(time.perf_counter() - t)
        return {
            "prefill_ms": statistics.median(pre) * 1e3,
            "prefill_min_ms": min(pre) * 1e3,
            "prefill_all_ms": [round(x * 1e3, 3) for x in pre],
            "step_ms": statistics.median(step_times) * 1e3,
            "step_mean_ms": statistics.mean(step_times) * 1e3,
            "prompt_tokens": len(prompt),
        }

    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd.pop("op")
            if op == "quit":
                break
            if op == "batch":
                prompts = [ids_of(m) for m in cmd["messages"]]
                send(batch(prompts, cmd["max_tokens"]))
            elif op == "single":
                send(single(ids_of(cmd["messages"]), cmd["steps"], cmd["reps"]))
            elif op == "tokenize":
                send({"lengths": [len(ids_of(m)) for m in cmd["messages"]]})
            else:
                send({"error": f"unknown op {op}"})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            send({"error": f"{type(exc).__name__}: {exc}"})


# -- one model, one BLAS setting ------------------------------------------------------------------
@dataclass
class Plan:
    label: str  # "demo", "big", "demo (no OpenBLAS)"
    model: Path
    blas: str | None
    concurrency: list[int]
    max_tokens: int
    single_rounds: int
    systems: list[str]


def run_plan(plan: Plan, args: argparse.Namespace, incidents: list[str], quiet: Quiet) -> dict[str, Any]:
    out: dict[str, Any] = {"label": plan.label, "model": str(plan.model), "blas": plan.blas,
                           "max_tokens": plan.max_tokens, "levels": {}, "servers": {}}
    eos = eos_ids(plan.model)
    out["eos_ids"] = eos
    work = Path(tempfile.mkdtemp(prefix=f"bench-serving-{plan.label.split()[0]}-"))
    out["workdir"] = str(work)
    servers: dict[str, Any] = {}
    ceiling: Ceiling | None = None
    log(f"== {plan.label}: {plan.model} (BLAS: {plan.blas or 'mlx bundled'}), work dir {work}")
    try:
        if "mlxtg" in plan.systems:
            servers["mlxtg"] = Mlxtg(plan.model, plan.blas, work, args.max_batch)
        if "mlx_lm" in plan.systems:
            servers["mlx_lm"] = MlxLmServer(plan.model, plan.blas, work, args.max_batch)
        for key, s in servers.items():
            log(f"starting {s.name}: {shlex.join(s.cmd)}")
            t = time.perf_counter()
            s.start(args.start_timeout)
            log(f"{s.name} ready in {time.perf_counter() - t:.1f}s on port {s.port}")
            out["servers"][key] = {"cmd": shlex.join(s.cmd), "port": s.port, "log": str(s.log_path)}
        if "ceiling" in plan.systems:
            ceiling = Ceiling(plan.model, plan.blas, work)
            info = ceiling.start(args.start_timeout)
            out["ceiling_info"] = info
            log(f"ceiling worker up: {info}")

        # Warm-up: one request per server (model load in mlx_lm.server, first kernels).
        for key, s in servers.items():
            body = request_body(s.model_field, messages("warmup", 0), 16, eos)
            t0, res = asyncio.run(fire(s.base, [body], args.request_timeout))
            summ = summarize(t0, res, 16)
            log(f"warm-up {s.name}: ok={summ['ok']} ttft={summ['ttft_p50']:.0f}ms {summ['errors']}")
            if summ["ok"] != 1:
                incidents.append(f"{plan.label}: warm-up on {s.name} failed: {summ['errors']}")
            out["servers"][key]["blas_in_use"] = s.blas_in_use()
        if isinstance(servers.get("mlxtg"), Mlxtg):
            ws = servers["mlxtg"].worker_stats()
            out["servers"]["mlxtg"]["worker_facts"] = ws.get("facts", {})
        if ceiling:
            ceiling.call(args.request_timeout, op="batch", messages=[messages("warmup", 1)],
                         max_tokens=16)
            ceiling.call(args.request_timeout, op="single", messages=messages("warmup", 2),
                         steps=4, reps=1)
        refs: list[dict[str, Any]] = []

        all_pids = [p for s in servers.values() for p in s.pids()] + (ceiling.pids() if ceiling else [])
        for c in plan.concurrency:
            rounds = plan.single_rounds if c == 1 else 1
            level: dict[str, list[dict[str, Any]]] = {k: [] for k in [*servers, "ceiling"]}
            for rnd in range(rounds):
                tag = f"{plan.label[:4]}-c{c}r{rnd}"
                msgs = [messages(tag, i) for i in range(c)]
                if ceiling and c == 1:
                    # The single-stream reference, next to the servers' c = 1 round on the
                    # same prompt: prefill + first argmax, then synchronous decode steps.
                    quiet.wait(all_pids)
                    ref = ceiling.call(args.request_timeout, op="single", messages=msgs[0],
                                       steps=min(plan.max_tokens, 32 if plan.label != "big" else 16),
                                       reps=args.single_reps if plan.label != "big" else 2)
                    refs.append(ref)
                    log(f"  in-process single stream: prefill {ref['prefill_min_ms']:.2f} ms (best of "
                        f"{len(ref['prefill_all_ms'])}, {ref['prompt_tokens']} tokens), "
                        f"step {ref['step_mean_ms']:.2f} ms")
                if ceiling:
                    quiet.wait(all_pids)
                    with CpuMeter(ceiling.pids()) as m:
                        cres = ceiling.call(args.request_timeout, op="batch", messages=msgs,
                                            max_tokens=plan.max_tokens)
                    cres.update(cpu_target=m.target_cores, cpu_other=m.other_cores, load=loadavg(),
                                tok_per_cpu_s=cres["total_tokens"] / max(m.target_cores * cres["wall_s"], 1e-9))
                    if not cres["counts_ok"]:
                        incidents.append(f"{plan.label} c={c}: ceiling token counts off")
                    level["ceiling"].append(cres)
                for key, s in servers.items():
                    bodies = [request_body(s.model_field, m_, plan.max_tokens, eos) for m_ in msgs]
                    quiet.wait(all_pids)
                    before = servers["mlxtg"].worker_stats().get("stats", {}) if key == "mlxtg" else {}
                    with CpuMeter(s.pids()) as m:
                        t0, res = asyncio.run(fire(s.base, bodies, args.request_timeout))
                    summ = summarize(t0, res, plan.max_tokens)
                    summ.update(cpu_target=m.target_cores, cpu_other=m.other_cores,
                                cpu_client=m.client_cores, load=loadavg())
                    summ["tok_per_cpu_s"] = summ["total_tokens"] / max(m.target_cores * summ["wall_s"], 1e-9)
                    if key == "mlxtg":
                        summ["worker_stats_before"] = before
                        summ["worker_stats_after"] = servers["mlxtg"].worker_stats().get("stats", {})
                    if summ["n_errors"] or summ["n_wrong"]:
                        incidents.append(
                            f"{plan.label} c={c} {s.name}: {summ['n_errors']} errors "
                            f"{summ['errors']}, {summ['n_wrong']} wrong token counts "
                            f"{summ['wrong_counts']} (expected {plan.max_tokens})"
                        )
                    level[key].append(summ)
            merged = {k: merge_rounds(v) for k, v in level.items() if v}
            out["levels"][c] = merged
            print_level(plan.label, c, merged)
        if refs:
            out["single_ref"] = {
                "rounds": refs,
                "prompt_tokens": refs[0]["prompt_tokens"],
                "prefill_ms": statistics.median(r["prefill_ms"] for r in refs),
                "prefill_best_ms": min(r["prefill_min_ms"] for r in refs),
                "step_ms": statistics.median(r["step_mean_ms"] for r in refs),
                "step_best_ms": min(r["step_mean_ms"] for r in refs),
            }
        for s in servers.values():
            if s.proc is not None and s.proc.poll() is not None:
                incidents.append(f"{plan.label}: {s.name} exited early ({s.proc.returncode})")
    except Exception as exc:  # noqa: BLE001 - record, keep going with the next plan
        msg = f"{plan.label}: {type(exc).__name__}: {exc}"
        log("ERROR " + msg)
        traceback.print_exc()
        incidents.append(msg)
        for s in servers.values():
            incidents.append(f"{plan.label}: {s.name} log tail:\n{s.tail(20)}")
    finally:
        if "mlxtg" in servers:
            out["mlxtg_log_tail"] = servers["mlxtg"].tail(40)
        for s in servers.values():
            s.stop()
        if ceiling:
            ceiling.stop()
    return out


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every numeric field (rounds only repeat at c = 1)."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[-1])
    for k, v in rounds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in rounds if isinstance(r.get(k), (int, float))]
            out[k] = statistics.median(vals)
    for k in ("n_errors", "n_wrong", "n", "ok", "total_tokens", "retries"):
        if k in rounds[0]:
            out[k] = sum(r[k] for r in rounds)
    out["per_round"] = {k: [r.get(k) for r in rounds]
                        for k in ("agg_tps", "ttft_p50", "itl_ms", "ttft_ms", "step_ms")
                        if k in rounds[0]}
    out["rounds"] = len(rounds)
    return out


# -- reporting ------------------------------------------------------------------------------------
def f(x: Any, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return format(x, fmt)


def print_level(label: str, c: int, lv: dict[str, Any]) -> None:
    parts = []
    for k, v in lv.items():
        parts.append(f"{k} {v['agg_tps']:.1f} tok/s (ttft p50 {f(v.get('ttft_p50', v.get('ttft_ms')), '.0f')} ms)")
    log(f"{label} c={c}: " + "; ".join(parts))


def level_table(res: dict[str, Any]) -> list[str]:
    rows = [
        "| c | system | agg tok/s | per-stream tok/s | TTFT p50 ms | TTFT p95 ms | ms/step (p50 gap) | "
        "vs mlx_lm.server | vs ceiling | errors / wrong counts / retries | CPU cores used (system / others) | tok per CPU-s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for c, lv in res["levels"].items():
        ceil = lv.get("ceiling")
        ref = lv.get("mlx_lm")
        for key in ("mlxtg", "mlx_lm", "ceiling"):
            v = lv.get(key)
            if not v:
                continue
            name = {"mlxtg": "**mlxtg**", "mlx_lm": "mlx_lm.server", "ceiling": "ceiling (BatchGenerator)"}[key]
            if key == "ceiling":
                rows.append(
                    f"| {c} | {name} | {f(v['agg_tps'])} | {f(v['decode_tps'] / c)} | "
                    f"{f(v['ttft_ms'], '.0f')} | {f(v['ttft_ms'], '.0f')} | {f(v['step_ms'], '.1f')} | | | "
                    f"{'' if v['counts_ok'] else 'token counts off'} | "
                    f"{f(v.get('cpu_target'), '.2f')} / {f(v.get('cpu_other'), '.2f')} | "
                    f"{f(v.get('tok_per_cpu_s'))} |"
                )
                continue
            vs_ref = f"{v['agg_tps'] / ref['agg_tps']:.2f}×" if ref and key != "mlx_lm" and ref["agg_tps"] else ""
            vs_ceil = f"{v['agg_tps'] / ceil['agg_tps']:.2f}×" if ceil and ceil["agg_tps"] else ""
            rows.append(
                f"| {c} | {name} | {f(v['agg_tps'])} | {f(v['per_stream_tps'])} | "
                f"{f(v['ttft_p50'], '.0f')} | {f(v['ttft_p95'], '.0f')} | {f(v['gap_p50_ms'], '.1f')} | "
                f"{vs_ref} | {vs_ceil} | {v['n_errors']} / {v['n_wrong']} / {v.get('retries', 0)} | "
                f"{f(v.get('cpu_target'), '.2f')} / {f(v.get('cpu_other'), '.2f')} | "
                f"{f(v.get('tok_per_cpu_s'))} |"
            )
    return rows


def first_token_groups(v: dict[str, Any]) -> list[int]:
    """Sizes of the groups in which streams got their first token: arrivals closer than half a
    decode step (or 10 ms) count as one group, i.e. released by the same engine step."""
    firsts = sorted(x[1] for x in v.get("raw_send_first_last_chunks_ms", []) if x[1] is not None)
    if not firsts:
        return []
    gap = max(10.0, 0.5 * (v.get("gap_p50_ms") or 0.0))
    groups = [1]
    for a, b in zip(firsts, firsts[1:], strict=False):
        if b - a > gap:
            groups.append(1)
        else:
            groups[-1] += 1
    return groups


def stall_table(res: dict[str, Any]) -> list[str]:
    rows = ["| c | system | first tokens released in groups of | inter-token gap p50 / p95 / max ms |",
            "|---:|---|---|---|"]
    for c, lv in res["levels"].items():
        if c == 1:
            continue
        for key, name in (("mlxtg", "mlxtg"), ("mlx_lm", "mlx_lm.server")):
            v = lv.get(key)
            if v:
                g = first_token_groups(v)
                rows.append(f"| {c} | {name} | {', '.join(map(str, g))} | "
                            f"{f(v['gap_p50_ms'], '.0f')} / {f(v['gap_p95_ms'], '.0f')} / "
                            f"{f(v['gap_max_ms'], '.0f')} |")
    return rows if len(rows) > 2 else []


def targets(res: dict[str, Any]) -> list[str]:
    out = []
    lv = res["levels"]
    if 16 in lv and "mlxtg" in lv[16]:
        m = lv[16]["mlxtg"]["agg_tps"]
        if "mlx_lm" in lv[16]:
            r = m / lv[16]["mlx_lm"]["agg_tps"]
            out.append(f"16 streams ≥ 1.5× mlx_lm.server: {r:.2f}× — **{'met' if r >= 1.5 else 'not met'}**")
        if "ceiling" in lv[16]:
            r = m / lv[16]["ceiling"]["agg_tps"]
            rd = m / (lv[16]["ceiling"]["decode_tps"])
            out.append(
                f"16 streams ≥ 0.9× ceiling: {r:.2f}× (end to end, same definition on both sides) — "
                f"**{'met' if r >= 0.9 else 'not met'}**; against the ceiling's decode-only rate "
                f"({lv[16]['ceiling']['decode_tps']:.1f} tok/s, prefill excluded): {rd:.2f}×"
            )
    if 1 in lv and "mlxtg" in lv[1] and "mlx_lm" in lv[1]:
        r = lv[1]["mlxtg"]["agg_tps"] / lv[1]["mlx_lm"]["agg_tps"]
        out.append(f"1 stream within 5 % of mlx_lm.server: {r:.3f}× — **{'met' if r >= 0.95 else 'not met'}**")
    ref = res.get("single_ref")
    if ref and 1 in lv and "mlxtg" in lv[1]:
        m = lv[1]["mlxtg"]
        pr = m.get("per_round", {})
        ttft_best = min(x for x in pr.get("ttft_p50", [m["ttft_p50"]]) if x == x)
        itl_best = min(x for x in pr.get("itl_ms", [m["itl_ms"]]) if x == x)
        n = len(pr.get("ttft_p50", [0]))
        for what, med, best, rmed, rbest, target in (
            ("TTFT − in-process prefill", m["ttft_p50"], ttft_best, ref["prefill_ms"],
             ref["prefill_best_ms"], 5.0),
            ("inter-token latency − in-process decode step", m["itl_ms"], itl_best, ref["step_ms"],
             ref["step_best_ms"], 0.5),
        ):
            d_med, d_best = med - rmed, best - rbest
            if max(d_med, d_best) <= target:
                verdict = "met"
            elif min(d_med, d_best) > target:
                verdict = "not met"
            else:
                verdict = "met on best-of only" if d_best <= target else "met on medians only"
            out.append(
                f"mlxtg c=1 {what} ({ref['prompt_tokens']}-token prompt), target ≤ {target:g} ms: "
                f"medians {med:.2f} − {rmed:.2f} = {d_med:.2f} ms; best of {n} rounds "
                f"{best:.2f} − {rbest:.2f} = {d_best:.2f} ms — **{verdict}**"
            )
        if "mlx_lm" in lv[1]:
            r = lv[1]["mlx_lm"]
            out.append(
                f"(for comparison, mlx_lm.server at c=1: TTFT {r['ttft_p50']:.2f} ms, "
                f"inter-token {r['itl_ms']:.2f} ms, medians)"
            )
    return out


def render_section(report: dict[str, Any]) -> str:
    m = report["machine"]
    L = [HEADING, ""]
    L.append(f"Command: `{report['command']}` (from the repository root; `make bench` runs the same). "
             f"Date: {report['date']}. Wall time: {report['wall_s'] / 60:.1f} min.")
    L.append("")
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}. "
             f"Python {m['python']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, mlxtg {m['mlxtg']}. "
             f"BLAS: {m['openblas'] or 'none found'} preloaded (LD_PRELOAD) into every MLX process "
             f"for the OpenBLAS runs (mlxtg's default; mlx_lm.server and the ceiling get the same "
             f"LD_PRELOAD); the reduced run uses the mlx[cpu] wheel's bundled BLAS everywhere.")
    L.append("")
    L.append(f"Load average at start: {report['load_start']}. Other busy processes at start: "
             + ("; ".join(f"`{p}`" for p in report["busy_start"]) or "none") + ".")
    L.append("")
    L.append(
        "Method: for each concurrency c, c streaming `/v1/chat/completions` requests are sent at once "
        "(distinct prompts whose first words differ, chat template applied by each server, "
        "temperature 0, `logit_bias` −100 on every EOS id so each request generates exactly "
        "`max_tokens`; the same body goes to both servers, except `model`). "
        "**agg tok/s** = completion tokens / (last token − first send). **per-stream tok/s** = mean "
        "over streams of (tokens − 1) / (last − first content chunk). **TTFT** = send → first "
        "non-empty content chunk. **ms/step** = median gap between a stream's content chunks "
        "(≈ one decode step). The **ceiling** is mlx-lm's `BatchGenerator` (prefill and completion "
        "batch = c, no stop tokens, no logits processors) in a subprocess on the same token ids: its "
        "TTFT is the batched prefill, its per-stream rate is its decode-only rate / c. mlx_lm.server "
        f"runs with `--decode-concurrency {report['max_batch']} --prompt-concurrency {report['max_batch']}`, "
        f"mlxtg with `--max-batch {report['max_batch']}`. All three stay up for the whole model and are "
        "measured level by level in the order ceiling, mlxtg, mlx_lm.server; each server got one "
        "warm-up request first. c = 1 is the median of "
        f"{report['single_rounds']} sequential rounds ({report.get('big_single_rounds')} for the big "
        "model), other levels are one round; each c = 1 round is preceded by an in-process "
        "single-stream measurement of the same prompt (prefill = one batch-1 forward + argmax; "
        "step = one synchronous forward + argmax at batch 1). "
        "A request whose connection drops before any response byte is retried at once (up to 3 "
        "times; TTFT counts from the first attempt). "
        "The last column is CPU cores used during the measurement by the system under test "
        "(process tree) and by everything else on the machine (other people's jobs; the benchmark "
        "client excluded) — this machine is shared, so read rows with a high second number with care."
    )
    L.append("")
    for res in report["results"]:
        params = res.get("params")
        shown = os.path.relpath(res["model"], ROOT) if str(res["model"]).startswith(str(ROOT)) else res["model"]
        L.append(f"### {res['label']}: `{shown}`"
                 + (f" ({params / 1e6:.1f} M params)" if params else "")
                 + f", max_tokens {res['max_tokens']}")
        L.append("")
        ci = res.get("ceiling_info", {})
        srv = res.get("servers", {})
        claim = srv.get("mlxtg", {}).get("worker_facts", {}).get("blas")
        L.append(
            "BLAS actually mapped (from /proc/PID/maps): "
            + ", ".join(f"{k}: {v.get('blas_in_use', '?')}"
                        + (f" (its worker reports \"{claim}\")" if k == "mlxtg" and claim else "")
                        for k, v in srv.items())
            + (f", ceiling: {ci.get('blas')} (1024² matmul {ci.get('matmul_gflops', 0):.1f} GFLOP/s)" if ci else "")
            + ". Prompt tokens: "
            + f(res.get("prompt_tokens_range"), "") + "."
        )
        L.append("")
        L += level_table(res)
        L.append("")
        st = stall_table(res)
        if st:
            L.append("How the streams started and flowed (from the client's chunk timestamps):")
            L.append("")
            L += st
            L.append("")
        for t in targets(res):
            L.append(f"- {t}")
        L.append("")
    if report.get("blas_compare"):
        L.append("### With and without OpenBLAS (demo model, aggregate tok/s)")
        L.append("")
        L += report["blas_compare"]
        L.append("")
    L.append("### Notes")
    L.append("")
    for n in auto_notes(report) + report.get("notes", []):
        L.append(f"- {n}")
    if report["incidents"]:
        L.append("")
        L.append("Incidents recorded during the run:")
        L.append("")
        L.append("```")
        L += [i for inc in report["incidents"] for i in inc.splitlines()]
        L.append("```")
    L.append("")
    L.append("![aggregate decode tokens/s vs concurrency](serving.png)")
    L.append("")
    return "\n".join(L)


STATIC_NOTES = [
    "Design differences that matter here (from the code, not measured): mlxtg prefills each "
    "request alone at batch 1 (chunks of up to 512 prompt tokens per engine step, interleaved with "
    "the decode step), while mlx_lm.server and the ceiling prefill up to --prompt-concurrency / c "
    "prompts together as one left-padded batch; mlxtg sends every token through worker → "
    "supervisor → gateway (three processes, ZeroMQ) before the HTTP stream, mlx_lm.server through "
    "one process; mlx_lm.server applies `logit_bias` per row in a Python loop each step, mlxtg as one "
    "(B, V) add.",
    "Both servers keep a prefix cache. Every prompt opens its system message with its own "
    "number, so the prompts share only `<|im_start|>system\\nNote ` (below mlxtg's 16-token "
    "minimum) and no server can skip prefill work the ceiling does.",
]


def auto_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    if report.get("quiet_waited_s"):
        notes.append(f"Waited {report['quiet_waited_s']:.0f}s in total for other jobs to quieten "
                     "before measurements (--quiet-threshold / --quiet-wait / --quiet-budget).")
    for res in report["results"]:
        noisy = []
        for c, lv in res["levels"].items():
            for key, v in lv.items():
                if (v.get("cpu_other") or 0) > 0.5:
                    noisy.append(f"c={c} {key} ({v['cpu_other']:.2f})")
                if key != "ceiling" and v.get("ok") and c > 1:
                    ps, agg = v.get("per_stream_tps", 0), v.get("agg_tps", 0)
                    if agg and ps == ps and ps > 5 * agg:
                        notes.append(
                            f"{res['label']} c={c} {key}: tokens reached the client in bursts "
                            f"(median chunk gap {v['gap_p50_ms']:.1f} ms, max {v['gap_max_ms']:.0f} ms), "
                            "so its per-stream rate is not a decode rate.")
        if noisy:
            notes.append(f"{res['label']}: other jobs used > 0.5 cores during " + ", ".join(noisy)
                         + " — those rows measure contention as much as the servers.")
        stalls = []
        plens = [n for lv in res["levels"].values() for n in lv.get("ceiling", {}).get("prompt_tokens", [])]
        plen = round(statistics.mean(plens)) if plens else 50
        for c, lv in res["levels"].items():
            m, r = lv.get("mlxtg"), lv.get("mlx_lm")
            if c > 1 and m and r and m.get("gap_max_ms", 0) > 2 * max(r.get("gap_max_ms", 0), 1.0):
                g = first_token_groups(m)
                stalls.append(f"c={c}: longest gap {m['gap_max_ms']:.0f} ms vs {r['gap_max_ms']:.0f} ms, "
                              f"gap p95 {m['gap_p95_ms']:.0f} vs {r['gap_p95_ms']:.0f} ms, first tokens "
                              f"in groups of {', '.join(map(str, g))}")
        if stalls:
            notes.append(
                f"{res['label']}: mlxtg's running streams stall while newly admitted requests prefill ("
                + "; ".join(stalls) + "). Reading of the code: an engine step decodes once, then "
                "prefills every waiting request that fits the 512-token prefill budget one after "
                "another at batch 1, and only then sends that step's tokens, so streams already "
                "running wait for all of those prefills and the first tokens of a group arrive "
                f"together (groups of up to {512 // max(plen, 1)} here: 512 / {plen}-token prompts).")
        ws = [lv.get("mlxtg", {}).get("worker_stats_after", {}) for lv in res["levels"].values()]
        pc = next((w.get("prefix_cache") for w in reversed(ws) if w.get("prefix_cache")), None)
        if pc:
            notes.append(f"{res['label']}: mlxtg prefix cache at the end: {pc.get('hits')} hits, "
                         f"{pc.get('hit_tokens')} tokens reused, {pc.get('misses')} misses.")
    return notes + STATIC_NOTES


def blas_compare(results: list[dict[str, Any]]) -> list[str]:
    fast = next((r for r in results if r["label"] == "demo"), None)
    slow = next((r for r in results if r["label"].startswith("demo (no")), None)
    if not fast or not slow:
        return []
    rows = ["| c | system | OpenBLAS | mlx bundled BLAS | speed-up |", "|---:|---|---:|---:|---:|"]
    for c, lv in slow["levels"].items():
        for key, name in (("mlxtg", "mlxtg"), ("mlx_lm", "mlx_lm.server"), ("ceiling", "ceiling")):
            a = fast["levels"].get(c, {}).get(key)
            b = lv.get(key)
            if a and b:
                rows.append(f"| {c} | {name} | {a['agg_tps']:.1f} | {b['agg_tps']:.1f} | "
                            f"{a['agg_tps'] / b['agg_tps']:.1f}× |")
    return rows


def write_results(path: Path, section: str) -> None:
    if path.exists():
        text = path.read_text()
        if HEADING in text:
            start = text.index(HEADING)
            nxt = text.find("\n## ", start + len(HEADING))
            text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
        else:
            text = text.rstrip() + "\n\n" + section
    else:
        text = "# Benchmark results\n\n" + section
    path.write_text(text.rstrip() + "\n")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in results if not r["label"].startswith("demo (no")]
    slow = next((r for r in results if r["label"].startswith("demo (no")), None)
    if not main:
        return
    fig, axes = plt.subplots(1, len(main), figsize=(6 * len(main), 4.5), squeeze=False)
    style = {"mlxtg": ("mlxtg", "tab:blue", "o"), "mlx_lm": ("mlx_lm.server", "tab:orange", "s"),
             "ceiling": ("ceiling (BatchGenerator)", "tab:green", "^")}
    for ax, res in zip(axes[0], main, strict=True):
        cs = sorted(res["levels"])
        for key, (name, color, marker) in style.items():
            pts = [(c, res["levels"][c][key]["agg_tps"]) for c in cs if key in res["levels"][c]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=name)
            if slow and res["label"] == "demo":
                sp = [(c, slow["levels"][c][key]["agg_tps"]) for c in sorted(slow["levels"])
                      if key in slow["levels"][c]]
                if sp:
                    ax.plot(*zip(*sp, strict=True), marker=marker, color=color, linestyle=":",
                            alpha=0.6, label=f"{name}, no OpenBLAS")
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs)
        ax.set_xticklabels([str(c) for c in cs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens/s")
        p = res.get("params")
        ax.set_title(f"{res['label']} model" + (f" ({p / 1e6:.3g} M params)" if p else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Aggregate decode tokens/s, streaming chat completions (shared 2-core CPU; "
                 "see RESULTS.md for contention)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- models ---------------------------------------------------------------------------------------
def model_params(path: Path) -> int | None:
    cfg = json.loads((path / "config.json").read_text())
    if "bench_params" in cfg:
        return int(cfg["bench_params"])
    h, L, i, v = (cfg.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    if not all((h, L, i, v)):
        return None
    kv = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    per = h * hd * cfg["num_attention_heads"] * 2 + h * hd * kv * 2 + 3 * h * i + 2 * h
    return L * per + v * h * (1 if cfg.get("tie_word_embeddings", True) else 2) + h


def ensure_big(demo: Path, args: argparse.Namespace) -> Path:
    name = f"big-llama-h{BIG_DIMS['hidden']}-l{args.big_layers}-i{BIG_DIMS['intermediate']}"
    path = OUT / name
    if model_ready(path) and (path / "config.json").stat().st_mtime >= (demo / "tokenizer.json").stat().st_mtime:
        return path
    log(f"building {path} (random weights, tokenizer from {demo})")
    cmd = [PY, "-m", "bench.common", "build-llama", "--out", str(path), "--tokenizer-src", str(demo),
           "--hidden", str(BIG_DIMS["hidden"]), "--layers", str(args.big_layers),
           "--intermediate", str(BIG_DIMS["intermediate"]), "--heads", str(BIG_DIMS["heads"])]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, env=env_without_preload(find_openblas()))
    return path


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma list of demo, big, or model folders [demo,big]")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--big-max-tokens", type=int, default=32, help="max_tokens for the big model")
    ap.add_argument("--big-layers", type=int, default=BIG_DIMS["layers"])
    ap.add_argument("--big-single-rounds", type=int, default=2, help="sequential rounds at c = 1, big model")
    ap.add_argument("--quiet-threshold", type=float, default=0.5,
                    help="wait before a measurement while other jobs use more cores than this")
    ap.add_argument("--quiet-wait", type=float, default=30, help="max seconds to wait per measurement")
    ap.add_argument("--quiet-budget", type=float, default=300, help="max seconds of waiting per run")
    ap.add_argument("--systems", default="mlxtg,mlx_lm,ceiling")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--single-rounds", type=int, default=5, help="sequential rounds at c = 1")
    ap.add_argument("--single-reps", type=int, default=5, help="in-process single-stream repetitions")
    ap.add_argument("--blas-compare", dest="no_blas", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the demo model without OpenBLAS at c = 1 and 16")
    ap.add_argument("--demo-model", default=str(DEMO_MODEL))
    ap.add_argument("--wait-demo", type=float, default=1800, help="seconds to wait for the demo model")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--quick", action="store_true", help="demo model, c = 1,4, 16 tokens, no files written")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write bench/RESULTS.md and bench/serving.png (default: yes unless --quick)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--chart", default=str(ROOT / "bench" / "serving.png"))
    ap.add_argument("--json-out", default=str(OUT / "serving.json"))
    ap.add_argument("--from-json", metavar="PATH",
                    help="re-render RESULTS.md / serving.png from a saved run instead of measuring")
    ap.add_argument("--ceiling-worker", metavar="MODEL", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.models = a.models or "demo"
        a.concurrency, a.max_tokens, a.big_max_tokens = "1,4", 16, 16
        a.single_rounds, a.no_blas = 1, False
    a.models = a.models or "demo,big"
    if a.write is None:
        a.write = not a.quick
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.ceiling_worker:
        ceiling_worker(args.ceiling_worker)
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for res in saved["results"]:
            res["levels"] = {int(k): v for k, v in res["levels"].items()}
        if saved.get("format", 1) < 2:  # older files stored the generated notes too
            saved["notes"] = []
        section = render_section(saved)
        print(section)
        if args.write:
            write_results(Path(args.results), section)
            plot(saved["results"], Path(args.chart))
            log(f"wrote {args.results} and {args.chart}")
        return 0
    t_start = time.perf_counter()
    command = "python -m bench.bench_serving" + ("" if argv is None and len(sys.argv) == 1 else
                                                 " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    machine = machine_info()
    blas = find_openblas()
    report: dict[str, Any] = {
        "command": command, "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine, "load_start": loadavg(), "busy_start": busy_processes(exclude={os.getpid()}),
        "max_batch": args.max_batch, "single_rounds": args.single_rounds,
        "big_single_rounds": args.big_single_rounds, "results": [],
        "incidents": [], "notes": [], "format": 2,
    }
    log(f"machine: {machine}; load {report['load_start']}; busy: {report['busy_start']}")
    if not blas:
        log("no OpenBLAS found: the 'OpenBLAS' runs use mlx's bundled BLAS")
    conc = [int(x) for x in args.concurrency.split(",") if x]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    demo = Path(args.demo_model)
    models: list[tuple[str, Path, int]] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "demo":
            if not wait_for_model(demo, args.wait_demo, log):
                report["incidents"].append(f"demo model not found at {demo}; skipped")
                continue
            models.append(("demo", demo, args.max_tokens))
        elif name == "big":
            if not wait_for_model(demo, args.wait_demo, log):
                report["incidents"].append("big model needs the demo model's tokenizer; skipped")
                continue
            models.append(("big", ensure_big(demo, args), args.big_max_tokens))
        else:
            models.append((Path(name).name, Path(name), args.max_tokens))
    plans = [Plan(lbl, p, blas, conc, mt, args.big_single_rounds if lbl == "big" else args.single_rounds,
                  systems) for lbl, p, mt in models]
    quiet = Quiet(args.quiet_threshold, args.quiet_wait, args.quiet_budget)
    if args.no_blas and blas and any(lbl == "demo" for lbl, _, _ in models):
        nb_conc = [c for c in (1, 16) if c in conc] or [1]
        plans.append(Plan("demo (no OpenBLAS)", demo, None, nb_conc, args.max_tokens,
                          args.single_rounds, systems))
    try:
        for plan in plans:
            res = run_plan(plan, args, report["incidents"], quiet)
            res["params"] = model_params(plan.model)
            lens = sorted({n for lv in res["levels"].values() if "ceiling" in lv
                           for n in lv["ceiling"]["prompt_tokens"]})
            res["prompt_tokens_range"] = f"{lens[0]}–{lens[-1]}" if lens else None
            # Did both servers see the same prompts as the ceiling?
            for c, lv in res["levels"].items():
                cl = lv.get("ceiling", {}).get("prompt_tokens")
                for key in ("mlxtg", "mlx_lm"):
                    sl = lv.get(key, {}).get("prompt_tokens")
                    got = sorted(x for x in (sl or []) if x is not None)
                    if cl and got and len(got) == len(cl) and got != sorted(cl):
                        report["notes"].append(
                            f"{plan.label} c={c}: {key} reported prompt_tokens {got[:6]}… "
                            f"vs ceiling {sorted(cl)[:6]}…")
            report["results"].append(res)
            for t in targets(res):
                log(f"{plan.label}: {t}")
    finally:
        report["wall_s"] = time.perf_counter() - t_start
        report["quiet_waited_s"] = quiet.waited
        report["blas_compare"] = blas_compare(report["results"])
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
        section = render_section(report)
        print("\n" + section)
        if args.write:
            write_results(Path(args.results), section)
            plot(report["results"], Path(args.chart))
            log(f"wrote {args.results} and {args.chart}")
        log(f"total wall time {report['wall_s'] / 60:.1f} min; raw data in {args.json_out}")
    return 1 if not report["results"] else 0


if __name__ == "__main__":
    sys.exit(main())
