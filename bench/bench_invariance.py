"""Is greedy output the same alone and batched? Batched prefill vs batch-1 prefill.

    python -m bench.bench_invariance [--prompts 64] [--tokens 24] [--models demo,big]

For each model, 64 distinct chat prompts of varied length are generated greedily:
1. alone: one request at a time, batch-1 prefill (the reference);
2. batched: all 64 submitted at once with batched (padded) prefill and batched decode;
3. alone-prefill: all 64 at once, prefill at batch 1, decode batched (the old engine's mode).
A prompt "diverges" when its token ids differ from the reference anywhere. Runs in this
process with OpenBLAS preloaded (it re-executes itself with LD_PRELOAD when needed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import DEMO_MODEL, find_openblas, log
from bench.models import SERVING_BIG, ensure_llama

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "weather", "in", "oslo", "is", "cold"]


def prompts(count: int) -> list[list[dict[str, str]]]:
    out = []
    for i in range(count):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + (i * 5) % 40)]
        out.append([{"role": "user", "content": f"request {i}: " + " ".join(words)}])
    return out


def run(model: Path, mode: str, convos: list[Any], tokens: int) -> tuple[list[list[int]], float]:
    from mlxtg.models import ModelSpec
    from mlxtg.protocol import Generate, Output
    from mlxtg.worker.engine import Engine
    from mlxtg.worker.loader import load
    from mlxtg.worker.params import SamplingParams
    from mlxtg.worker.prefix_cache import RamPrefixCache
    from mlxtg.worker.preprocess import Preprocessor
    from mlxtg.worker.prompt_cache import PromptCache
    from mlxtg.worker.scheduler import Scheduler

    loaded = load(ModelSpec(model_id_or_path=str(model)))
    batched = mode == "batched"
    scheduler = Scheduler(max_batch=len(convos), max_queued=len(convos), padded=batched,
                          chunk_tokens=512, idle_chunk_tokens=4096)
    engine = Engine(loaded, PromptCache(RamPrefixCache(0)), scheduler=scheduler,
                    batched_prefill=batched)
    pre = Preprocessor(loaded)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    reqs = [pre(Generate(request_id=str(i), model="m", params=params, messages=m))
            for i, m in enumerate(convos)]
    out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    waves = [[r] for r in reqs] if mode == "alone" else [reqs]
    started = time.perf_counter()
    for wave in waves:
        messages = engine.step(wave)
        while True:
            for m in messages:
                if isinstance(m, Output):
                    for d in m.deltas:
                        out[d.request_id].extend(d.token_ids)
            if engine.idle:
                break
            messages = engine.step()
    return [out[r.request_id] for r in reqs], time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--models", default="demo,big")
    args = ap.parse_args(argv)
    blas = find_openblas()
    if blas and blas not in os.environ.get("LD_PRELOAD", ""):
        os.environ["LD_PRELOAD"] = blas
        os.execv(sys.executable, [sys.executable, "-m", "bench.bench_invariance", *sys.argv[1:]])
    convos = prompts(args.prompts)
    rows = []
    for name in args.models.split(","):
        model = DEMO_MODEL if name == "demo" else ensure_llama(SERVING_BIG, log=log)
        ref, t_ref = run(model, "alone", convos, args.tokens)
        for mode in ("batched", "alone-prefill"):
            got, t = run(model, mode, convos, args.tokens)
            diverged = [i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b]
            first = [next(j for j, (x, y) in enumerate(zip(ref[i], got[i], strict=True)) if x != y)
                     for i in diverged]
            rows.append((name, mode, len(diverged), len(convos), first, t, t_ref))
            log(f"{name} {mode}: {len(diverged)}/{len(convos)} diverge")
    print(f"Command: `python -m bench.bench_invariance --prompts {args.prompts} "
          f"--tokens {args.tokens} --models {args.models}`. BLAS: {blas or 'bundled'}.\n")
    print("| model | mode (vs alone, batch-1 prefill) | prompts diverging | first differing token |"
          " wall s (alone: s) |")
    print("|---|---|---:|---|---:|")
    for name, mode, n, total, first, t, t_ref in rows:
        where = ", ".join(str(f) for f in first[:8]) + (" ..." if len(first) > 8 else "") or "-"
        print(f"| {name} | {mode} | {n} / {total} | {where} | {t:.1f} ({t_ref:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
