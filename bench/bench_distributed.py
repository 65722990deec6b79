"""One rank against two on one machine (issue 13): a correctness and overhead check, not a
speed claim. Both ranks share this machine's cores, so two ranks cannot be faster here.

    python -m bench.bench_distributed [--models demo,big] [--rounds 3] [--write]

One `mlxtg up` serves each model twice: `solo` (one worker process) and `sharded` (the same
weights split by tensor over two ranks of MLX's ring backend on 127.0.0.1). Each round
streams 1 and then 4 greedy chat requests of `--tokens` tokens at each, alternating which goes
first, and checks that both return the same text. Separately, two bare ranks time one ring
all-sum of a decode step's activations: the collective a tensor split pays twice per layer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_distributed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import (  # noqa: E402
    DEMO_MODEL,
    OUT,
    ROOT,
    env_with_preload,
    find_openblas,
    free_port,
    git_commit,
    log,
    machine_info,
)
from bench.models import SERVING_BIG, ensure_llama  # noqa: E402
from bench.servers import Mlxtg  # noqa: E402
from bench.streams import fire, request_body, summarize  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Count from 1 to 10.",
    "Tell me a joke.",
    "Why is the sky blue?",
]

ALL_SUM = """
import json, sys, time
import mlx.core as mx
g = mx.distributed.init(strict=True, backend="ring")
out = {}
for floats in json.loads(sys.argv[1]):
    x = mx.ones((floats,))
    for _ in range(5):
        mx.eval(mx.distributed.all_sum(x))
    times = []
    for _ in range(60):
        t = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x))
        times.append(time.perf_counter() - t)
    out[floats] = sorted(times)[len(times) // 2] * 1e6
if g.rank() == 0:
    print(json.dumps(out))
"""


def all_sum_latency(sizes: list[int]) -> dict[str, float]:
    """Median microseconds of one ring all-sum of `n` float32 between two local ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        hosts = Path(tmp) / "ring.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
        env = env_with_preload(find_openblas()) | {"MLX_HOSTFILE": str(hosts)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", ALL_SUM, json.dumps(sizes)],
                env=env | {"MLX_RANK": str(r)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
    return dict(json.loads(outs[0]))


def config_for(model: Path, home: Path) -> Path:
    path = home / "models.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "max_resident_models: 2\ncache_disk_gb: 0\ncache_ram_gb: 0\nmodels:\n"
        f"  - model_id_or_path: {model}\n    model_name: solo\n"
        f"  - model_id_or_path: {model}\n    model_name: sharded\n"
        "    distributed:\n      hosts: [127.0.0.1, 127.0.0.1]\n"
    )
    return path


def eos_ids(model: Path) -> list[int]:
    cfg = json.loads((model / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if eos is not None else []


def measure(server: Mlxtg, model: Path, name: str, streams: int, tokens: int) -> dict[str, Any]:
    eos = eos_ids(model)
    bodies = [
        request_body(name, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokens, eos)
        for i in range(streams)
    ]
    t0, results = asyncio.run(fire(server.base, bodies, timeout=600))
    summary = summarize(t0, results, tokens)
    return {
        "agg_tps": summary["agg_tps"],
        "itl_ms": summary["itl_ms"],
        "ttft_p50": summary["ttft_p50"],
        "errors": summary["n_errors"] + summary["n_wrong"],
    }


def greedy_texts(server: Mlxtg, name: str, tokens: int) -> list[str]:
    import httpx

    texts = []
    for prompt in PROMPTS:
        body = {
            "model": name,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
        }
        r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=600)
        texts.append(r.json()["choices"][0]["message"]["content"])
    return texts


def run_model(label: str, model: Path, rounds: int, tokens: int, workdir: Path) -> dict[str, Any]:
    server = Mlxtg(None, find_openblas(), workdir, config=config_for(model, workdir / "home"))
    server.start(timeout=600)
    rows: dict[str, dict[int, list[dict[str, Any]]]] = {"solo": {}, "sharded": {}}
    try:
        for name in ("solo", "sharded"):  # load both before timing
            measure(server, model, name, 1, 4)
        for r in range(rounds):
            order = ("solo", "sharded") if r % 2 == 0 else ("sharded", "solo")
            for streams in (1, 4):
                got = {name: measure(server, model, name, streams, tokens) for name in order}
                for name in order:
                    rows[name].setdefault(streams, []).append(got[name])
                log(
                    f"{label} round {r} x{streams}: "
                    + ", ".join(f"{n} {got[n]['agg_tps']:.1f} tok/s" for n in order)
                )
        same_text = greedy_texts(server, "solo", tokens) == greedy_texts(server, "sharded", tokens)
        errors = sum(x["errors"] for name in rows for runs in rows[name].values() for x in runs)
    finally:
        server.stop()

    def med(name: str, streams: int, key: str) -> float:
        return statistics.median(x[key] for x in rows[name][streams])

    result: dict[str, Any] = {
        "model": str(model),
        "same_greedy_text": same_text,
        "errors_or_short_streams": errors,
        "streams": {},
    }
    for streams in (1, 4):
        solo, sharded = med("solo", streams, "agg_tps"), med("sharded", streams, "agg_tps")
        result["streams"][streams] = {
            "solo_tps": solo,
            "sharded_tps": sharded,
            "ratio": sharded / solo,
            "solo_itl_ms": med("solo", streams, "itl_ms"),
            "sharded_itl_ms": med("sharded", streams, "itl_ms"),
        }
    one = result["streams"][1]
    result["step_overhead_ms"] = one["sharded_itl_ms"] - one["solo_itl_ms"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,big")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--write", action="store_true", help="save bench/out/distributed.json")
    args = ap.parse_args()
    os.chdir(ROOT)
    models = {"demo": DEMO_MODEL}
    if "big" in args.models.split(","):
        models["big"] = ensure_llama(SERVING_BIG)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "machine": machine_info(),
        # A decode step's activations: rows x hidden floats (demo 128, big 768).
        "all_sum_us": all_sum_latency([128, 768, 16 * 768, 512 * 768]),
        "models": {},
    }
    log(f"ring all-sum, 2 local ranks (median us by float32 count): {report['all_sum_us']}")
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models.split(","):
            workdir = Path(tmp) / label
            workdir.mkdir()
            report["models"][label] = run_model(
                label, models[label], args.rounds, args.tokens, workdir
            )
    print(json.dumps(report, indent=2, default=str))
    if args.write:
        OUT.mkdir(exist_ok=True)
        (OUT / "distributed.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
