"""Serving benchmark: mlxtg vs mlx_lm.server (vs vllm-mlx) vs mlx-lm's in-process BatchGenerator.

    python -m bench.bench_serving                  # demo model + a ~74 M random Llama; prints the section
    python -m bench.bench_serving --write          # ... and writes bench/RESULTS.md and bench/serving.png
    python -m bench.bench_serving --quick          # smoke run: demo model, 1 round, c = 1 and 4, 8 tokens
    python -m bench.bench_serving --concurrency 1,4,16,32 --vllm-mlx /path/to/venv/bin/python

For each model (OpenBLAS preloaded into every process that runs MLX), every system stays up for
the whole model; each of `--rounds` rounds measures every concurrency level on every system, the
systems' order rotating from round to round. A level is c concurrent streaming chat completions
(distinct prompts, temperature 0, EOS banned with logit_bias so every request generates exactly
max_tokens); the ceiling runs the same token ids through BatchGenerator at batch c. Then a
reduced run without OpenBLAS (demo model, c = 1 and 16). Reporting: `bench.serving_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_serving.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.ceiling import Ceiling  # noqa: E402
from bench.common import (  # noqa: E402
    DEMO_MODEL,
    OUT,
    ROOT,
    CpuMeter,
    Quiet,
    busy_processes,
    find_openblas,
    loadavg,
    log,
    machine_info,
)
from bench.models import SERVING_BIG, ensure_llama, eos_ids, model_params, wait_for_model  # noqa: E402
from bench.servers import MlxLmServer, Mlxtg, Server, VllmMlx  # noqa: E402
from bench.serving_report import blas_compare, levels, plot, render_section, targets, write_results  # noqa: E402
from bench.streams import fire, request_body, summarize  # noqa: E402

# Words the demo model's tokenizer has as single tokens (its BPE saw only its own corpus).
WORDS = {
    "city": ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Madrid", "Berlin", "Denver", "Sydney", "Toronto",
             "Dublin", "Rome", "Vienna", "Prague", "Lisbon", "Seoul"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "cat": ["fruits", "animals", "colors", "vegetables", "sports", "planets", "instruments"],
    "color": ["blue", "green", "yellow", "purple", "orange", "white", "brown", "pink"],
    "fruit": ["apple", "banana", "cherry", "mango", "lemon", "grape", "peach", "melon"],
}
BANNED_TAGS = ("<tool_call>", "<tool_response>")  # keep the servers' tool-call parsers idle


def messages(tag: str, idx: int) -> list[dict[str, str]]:
    """A distinct ~45-token request. A per-prompt number opens the system message, so prompts
    share only the few template tokens before it: no server gets a prefix-cache hit the
    in-process ceiling cannot have. Nothing asks about the weather (the demo model answers
    that with a tool call)."""
    r = random.Random(f"{tag}/{idx}")
    n = zlib.crc32(f"{tag}/{idx}".encode()) % 900000 + 100000
    w = {k: r.choice(v) for k, v in WORDS.items()}
    user = (f"List three {w['cat']}, name a {w['color']} {w['fruit']}, and tell me about "
            f"{w['city']} on {w['day']}.")
    return [{"role": "system", "content": f"Note {n}. You are a helpful assistant."},
            {"role": "user", "content": user}]


@dataclass(slots=True)
class Plan:
    label: str  # "demo", "big", "demo (no OpenBLAS)", or a folder name
    model: Path
    blas: str | None
    concurrency: list[int]
    max_tokens: int


def start_systems(plan: Plan, args: argparse.Namespace, work: Path, out: dict[str, Any],
                  servers: dict[str, Server]) -> Ceiling | None:
    """Start every server (into `servers` as it goes, so the caller stops what did start)."""
    if "mlxtg" in args.systems:
        servers["mlxtg"] = Mlxtg(plan.model, plan.blas, work, args.max_batch)
    if "mlx_lm" in args.systems:
        servers["mlx_lm"] = MlxLmServer(plan.model, plan.blas, work, args.max_batch)
    if args.vllm_mlx:
        servers["vllm_mlx"] = VllmMlx(plan.model, plan.blas, work, args.max_batch, python=args.vllm_mlx)
    for key, s in servers.items():
        log(f"starting {s.name}")
        took = s.start(args.start_timeout)
        log(f"{s.name} ready in {took:.1f}s on port {s.port}: {shlex.join(s.cmd)}")
        out["servers"][key] = {"cmd": shlex.join(s.cmd), "log": str(s.log_path)}
    ceiling = None
    if "ceiling" in args.systems:
        ceiling = Ceiling(plan.model, plan.blas, work)
        out["ceiling_info"] = ceiling.start(args.start_timeout)
        log(f"ceiling worker up: {out['ceiling_info']}")
    return ceiling


def warm_up(servers: dict[str, Server], ceiling: Ceiling | None, eos: list[int], args: argparse.Namespace,
            out: dict[str, Any], incidents: list[str], label: str) -> None:
    """One request per server (model load in mlx_lm.server, first kernels), then record the
    BLAS each process tree actually mapped."""
    for key, s in servers.items():
        t0, res = asyncio.run(fire(s.base, [request_body(s.model_field, messages("warmup", 0), 8, eos)],
                                   args.request_timeout))
        summ = summarize(t0, res, 8)
        log(f"warm-up {s.name}: ok={summ['ok']} ttft={summ['ttft_p50']:.0f}ms {summ['errors']}")
        if summ["ok"] != 1:
            incidents.append(f"{label}: warm-up on {s.name} failed: {summ['errors']}")
        out["servers"][key]["blas_in_use"] = s.blas_in_use()
    if isinstance(servers.get("mlxtg"), Mlxtg):
        out["servers"]["mlxtg"]["worker_facts"] = servers["mlxtg"].worker().get("facts", {})  # type: ignore[attr-defined]
    if ceiling:
        ceiling.call(args.request_timeout, op="batch", messages=[messages("warmup", 1)], max_tokens=8)
        ceiling.call(args.request_timeout, op="single", messages=messages("warmup", 2), steps=4, reps=1)


def measure_server(s: Server, msgs: list[list[dict[str, str]]], plan: Plan, eos: list[int],
                   args: argparse.Namespace) -> dict[str, Any]:
    bodies = [request_body(s.model_field, m, plan.max_tokens, eos) for m in msgs]
    with CpuMeter(s.pids()) as m:
        t0, res = asyncio.run(fire(s.base, bodies, args.request_timeout))
    summ = summarize(t0, res, plan.max_tokens)
    summ.update(cpu_target=m.target_cores, cpu_other=m.other_cores, load=loadavg())
    return summ


def measure_ceiling(ceiling: Ceiling, msgs: list[list[dict[str, str]]], plan: Plan,
                    args: argparse.Namespace) -> dict[str, Any]:
    with CpuMeter(ceiling.pids()) as m:
        cres = ceiling.call(args.request_timeout, op="batch", messages=msgs, max_tokens=plan.max_tokens)
    c = len(msgs)
    cres.update(cpu_target=m.target_cores, cpu_other=m.other_cores, load=loadavg(),
                per_stream_tps=cres["decode_tps"] / c, ttft_p50=cres["ttft_ms"], ttft_p95=cres["ttft_ms"])
    return cres


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sequential single-stream repeats inside one round: median per numeric field."""
    out = dict(runs[-1])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
            out[k] = statistics.median(vals) if vals else float("nan")
    for k in ("n_errors", "n_wrong", "retries", "n", "ok", "total_tokens"):
        if k in runs[0]:
            out[k] = sum(r[k] for r in runs)
    out["prompt_tokens"] = [p for r in runs for p in r.get("prompt_tokens", [])]
    return out


def run_plan(plan: Plan, args: argparse.Namespace, incidents: list[str], quiet: Quiet) -> dict[str, Any]:
    out: dict[str, Any] = {"label": plan.label, "model": str(plan.model), "blas": plan.blas,
                           "max_tokens": plan.max_tokens, "rounds": [], "single_ref": [], "servers": {}}
    eos = eos_ids(plan.model, BANNED_TAGS)
    out["eos_ids"] = eos
    work = Path(tempfile.mkdtemp(prefix=f"bench-serving-{plan.label.split()[0]}-"))
    log(f"== {plan.label}: {plan.model} (BLAS: {plan.blas or 'mlx bundled'}), work dir {work}")
    servers: dict[str, Server] = {}
    ceiling: Ceiling | None = None
    try:
        ceiling = start_systems(plan, args, work, out, servers)
        warm_up(servers, ceiling, eos, args, out, incidents, plan.label)
        keys = [*servers, *(["ceiling"] if ceiling else [])]
        pids = [p for s in servers.values() for p in s.pids()] + (ceiling.pids() if ceiling else [])
        for rnd in range(args.rounds):
            order = keys[rnd % len(keys):] + keys[: rnd % len(keys)]
            log(f"{plan.label} round {rnd + 1}/{args.rounds}: order {', '.join(order)}")
            this: dict[str, dict[str, Any]] = {}
            for c in plan.concurrency:
                reps = args.single_repeats if c == 1 else 1
                batches = [[messages(f"{plan.label[:4]}-c{c}r{rnd}s{i}", j) for j in range(c)] for i in range(reps)]
                if ceiling and c == 1:  # the in-process single-stream reference, same prompt
                    quiet.wait(pids)
                    out["single_ref"].append(ceiling.call(args.request_timeout, op="single", messages=batches[0][0],
                                                          steps=min(plan.max_tokens, 16), reps=3))
                level: dict[str, Any] = {}
                for key in order:
                    runs = []
                    for msgs in batches:
                        quiet.wait(pids)
                        if key == "ceiling" and ceiling:
                            runs.append(measure_ceiling(ceiling, msgs, plan, args))
                        else:
                            runs.append(measure_server(servers[key], msgs, plan, eos, args))
                    level[key] = runs[0] if len(runs) == 1 else median_of(runs)
                    v = level[key]
                    if v.get("n_errors") or v.get("n_wrong") or v.get("counts_ok") is False:
                        incidents.append(f"{plan.label} round {rnd + 1} c={c} {key}: {v.get('n_errors', 0)} errors "
                                         f"{v.get('errors', [])}, {v.get('n_wrong', 0)} wrong token counts "
                                         f"{v.get('wrong_counts', [])} (expected {plan.max_tokens})")
                this[str(c)] = level
                log(f"{plan.label} r{rnd + 1} c={c}: " + "; ".join(
                    f"{k} {v['agg_tps']:.1f} tok/s, ttft p50 {v['ttft_p50']:.0f} ms" for k, v in level.items()))
            out["rounds"].append(this)
        if isinstance(servers.get("mlxtg"), Mlxtg):
            out["mlxtg_prefix_cache"] = servers["mlxtg"].worker().get("stats", {}).get("prefix_cache")  # type: ignore[attr-defined]
        for s in servers.values():
            if not s.alive():
                incidents.append(f"{plan.label}: {s.name} exited early")
    except Exception as exc:  # noqa: BLE001 - record, keep going with the next plan
        log(f"ERROR {plan.label}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        incidents.append(f"{plan.label}: {type(exc).__name__}: {exc}")
        incidents += [f"{plan.label}: {s.name} log tail:\n{s.tail(20)}" for s in servers.values()]
    finally:
        for s in servers.values():
            s.stop()
        if ceiling:
            ceiling.stop()
    lens = sorted({n for rnd in out["rounds"] for lv in rnd.values() for n in lv.get("ceiling", {}).get("prompt_tokens", [])})
    out["prompt_tokens_range"] = f"{lens[0]}–{lens[-1]}" if lens else None
    out["params"] = model_params(plan.model)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma list of demo, big, or model folders [demo,big; --quick: demo]")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--c32", action="store_true", help="also measure 32 streams")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-repeats", type=int, default=3, help="sequential requests per round at c = 1")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--big-max-tokens", type=int, default=48, help="max_tokens for the big model")
    ap.add_argument("--big-layers", type=int, default=SERVING_BIG.layers, help="layers of the random Llama")
    ap.add_argument("--systems", default="mlxtg,mlx_lm,ceiling")
    ap.add_argument("--vllm-mlx", metavar="PYTHON", help="also run vllm-mlx from this interpreter's venv")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--blas-compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the demo model without OpenBLAS at c = 1 and 16")
    ap.add_argument("--quiet-threshold", type=float, default=0.5,
                    help="wait before a measurement while other jobs use more cores than this")
    ap.add_argument("--quiet-wait", type=float, default=30, help="max seconds to wait per measurement")
    ap.add_argument("--quiet-budget", type=float, default=300, help="max seconds of waiting per run")
    ap.add_argument("--demo-model", default=str(DEMO_MODEL))
    ap.add_argument("--wait-demo", type=float, default=1800, help="seconds to wait for the demo model")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--quick", action="store_true", help="smoke run: demo, 1 round, c = 1,4, 8 tokens")
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS.md and bench/serving.png")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--chart", default=str(ROOT / "bench" / "serving.png"))
    ap.add_argument("--json-out", default=str(OUT / "serving.json"))
    ap.add_argument("--from-json", metavar="PATH", help="re-render a saved run instead of measuring")
    a = ap.parse_args(argv)
    if a.quick:
        a.concurrency, a.max_tokens, a.big_max_tokens = "1,4", 8, 8
        a.rounds, a.single_repeats, a.blas_compare, a.quiet_budget = 1, 1, False, 0
    a.models = a.models or ("demo" if a.quick else "demo,big")
    if a.c32 and "32" not in a.concurrency.split(","):
        a.concurrency += ",32"
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    return a


def plans_for(args: argparse.Namespace, incidents: list[str]) -> list[Plan]:
    blas, demo = find_openblas(), Path(args.demo_model)
    conc = [int(x) for x in args.concurrency.split(",") if x]
    plans = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name in ("demo", "big") and not wait_for_model(demo, args.wait_demo, log):
            incidents.append(f"{name}: needs the demo model (or its tokenizer) at {demo}; skipped")
        elif name == "demo":
            plans.append(Plan("demo", demo, blas, conc, args.max_tokens))
        elif name == "big":
            dims = dataclasses.replace(SERVING_BIG, layers=args.big_layers)
            plans.append(Plan("big", ensure_llama(dims, demo, log=log), blas, conc, args.big_max_tokens))
        else:
            plans.append(Plan(Path(name).name, Path(name), blas, conc, args.max_tokens))
    if args.blas_compare and blas and any(p.label == "demo" for p in plans):
        plans.append(Plan("demo (no OpenBLAS)", demo, None, [c for c in (1, 16) if c in conc] or [1], args.max_tokens))
    return plans


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args, argv)
    section = render_section(report | {"chart": args.write})
    print("\n" + section)
    if args.write:
        write_results(Path(args.results), section)
        plot(report["results"], Path(args.chart))
        log(f"wrote {args.results} and {args.chart}")
    return 0 if report["results"] and not report["incidents"] else 1


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    rest = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "command": "python -m bench.bench_serving" + (" " + shlex.join(rest) if rest else ""),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_info(),
        "load_start": loadavg(), "busy_start": busy_processes(exclude={os.getpid()}),
        "max_batch": args.max_batch, "rounds": args.rounds, "single_repeats": args.single_repeats,
        "results": [], "incidents": [], "notes": [], "format": 3,
    }
    log(f"machine: {report['machine']}; load {report['load_start']}; busy: {report['busy_start']}")
    quiet = Quiet(args.quiet_threshold, args.quiet_wait, args.quiet_budget)
    try:
        for plan in plans_for(args, report["incidents"]):
            res = run_plan(plan, args, report["incidents"], quiet)
            report["results"].append(res)
            for t in targets(res, levels(res)):
                log(f"{plan.label}: {t}")
    finally:
        report["wall_s"] = time.perf_counter() - t_start
        report["quiet_waited_s"] = quiet.waited
        report["blas_compare"] = blas_compare(report["results"])
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
        log(f"total wall time {report['wall_s'] / 60:.1f} min; raw data in {args.json_out}")
    return report


if __name__ == "__main__":
    sys.exit(main())
