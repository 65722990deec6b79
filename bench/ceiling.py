"""The ceiling: mlx-lm's `BatchGenerator` in a subprocess, with no server around it.

The parent side (`Ceiling`) sends JSON commands on stdin and reads `RESULT {...}` lines:
`batch` (c prompts prefilled and decoded together, prefill and completion batch = c, no stop
tokens, no logits processors), `single` (batch-1 prefill + argmax, then synchronous decode
steps: what one stream costs in process), `tokenize`, `quit`. The child is
`python -m bench.ceiling MODEL`, started with the same BLAS preload as the servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/ceiling.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import ROOT, env_with_preload  # noqa: E402
from bench.servers import PY, blas_from_maps, stop_tree  # noqa: E402


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
            [PY, "-m", "bench.ceiling", str(self.model)],
            cwd=ROOT,
            env=env_with_preload(self.blas),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        try:
            return self._read(timeout)
        except Exception:
            self.stop()
            raise

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


def worker(model_path: str) -> None:
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


if __name__ == "__main__":
    worker(sys.argv[1])
