"""Reporting for `bench.bench_serving`: per-round results in, markdown section and chart out.

A run's results hold, per model, one dict per round: `rounds[r][str(c)][system] = summary`.
Everything shown is derived here: medians over rounds, each ratio's median with its spread
(min–max over rounds, the ratio taken within a round so both sides saw the same load), and
the targets of the issue as met / not met.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from bench.common import ROOT, replace_section

HEADING = "## Serving throughput and latency (issue: continuous batching)"
NAMES = {"mlxtg": "**mlxtg**", "mlx_lm": "mlx_lm.server", "vllm_mlx": "vllm-mlx",
         "ceiling": "ceiling (BatchGenerator)"}
SERVERS = ("mlxtg", "mlx_lm", "vllm_mlx")
COUNTS = ("n_errors", "n_wrong", "retries")


def f(x: Any, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return format(x, fmt)


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of every numeric field; counts are summed."""
    out = dict(rounds[-1])
    for k, v in rounds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [r[k] for r in rounds if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
            out[k] = statistics.median(vals) if vals else float("nan")
    for k in COUNTS:
        if k in rounds[0]:
            out[k] = sum(r.get(k, 0) for r in rounds)
    out["agg_all"] = [r.get("agg_tps") for r in rounds]
    return out


def levels(res: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """c -> system -> merged summary, plus c -> "ratios" -> name -> per-round values."""
    out: dict[int, dict[str, Any]] = {}
    cs = sorted({int(c) for rnd in res["rounds"] for c in rnd})
    for c in cs:
        per = [rnd[str(c)] for rnd in res["rounds"] if str(c) in rnd]
        keys = [k for k in (*SERVERS, "ceiling") if any(k in p for p in per)]
        lv: dict[str, Any] = {k: merge([p[k] for p in per if k in p]) for k in keys}
        ratios: dict[str, list[float]] = {}
        for p in per:
            m = p.get("mlxtg")
            for other, name in (("mlx_lm", "vs_mlx_lm"), ("ceiling", "vs_ceiling"), ("vllm_mlx", "vs_vllm_mlx")):
                if m and p.get(other) and p[other].get("agg_tps"):
                    ratios.setdefault(name, []).append(m["agg_tps"] / p[other]["agg_tps"])
            if m and p.get("mlx_lm") and p["mlx_lm"].get("per_stream_tps"):
                ratios.setdefault("decode_vs_mlx_lm", []).append(m["per_stream_tps"] / p["mlx_lm"]["per_stream_tps"])
        lv["ratios"] = ratios
        out[c] = lv
    return out


def spread(xs: list[float] | None, fmt: str = ".2f", unit: str = "×") -> str:
    if not xs:
        return ""
    med = statistics.median(xs)
    return f"{med:{fmt}}{unit}" + (f" ({min(xs):{fmt}}–{max(xs):{fmt}})" if len(xs) > 1 else "")


def level_table(lvs: dict[int, dict[str, Any]]) -> list[str]:
    rows = ["| c | system | agg tok/s (min–max) | decode tok/s per stream | TTFT p50 ms | TTFT p95 ms | "
            "step ms (median gap) | stream median gap, median / max ms | gap p95 ms | vs mlx_lm.server | "
            "vs ceiling | errors / wrong counts / retries | CPU cores (system / others) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c, lv in lvs.items():
        r = lv["ratios"]
        for key in (*SERVERS, "ceiling"):
            v = lv.get(key)
            if not v:
                continue
            agg = spread(v["agg_all"], ".1f", "")
            cpu = f"{f(v.get('cpu_target'), '.2f')} / {f(v.get('cpu_other'), '.2f')}"
            if key == "ceiling":
                rows.append(f"| {c} | {NAMES[key]} | {agg} | {f(v['decode_tps'] / c)} | {f(v['ttft_ms'], '.0f')} | "
                            f"{f(v['ttft_ms'], '.0f')} | {f(v['step_ms'])} | | | | | "
                            f"{'' if v.get('counts_ok', True) else 'token counts off'} | {cpu} |")
                continue
            vs_ref = spread(r.get("vs_mlx_lm")) if key == "mlxtg" else ""
            vs_ceil = spread(r.get("vs_ceiling")) if key == "mlxtg" else ""
            rows.append(
                f"| {c} | {NAMES[key]} | {agg} | {f(v['per_stream_tps'])} | {f(v['ttft_p50'], '.0f')} | "
                f"{f(v['ttft_p95'], '.0f')} | {f(v['step_ms'])} | {f(v['stream_gap_p50_ms'])} / "
                f"{f(v['stream_gap_max_ms'])} | {f(v['gap_p95_ms'])} | {vs_ref} | {vs_ceil} | "
                f"{v['n_errors']} / {v['n_wrong']} / {v.get('retries', 0)} | {cpu} |")
    return rows


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(res: dict[str, Any], lvs: dict[int, dict[str, Any]] | None = None) -> list[str]:
    """The issue's targets for this model, as met / not met (medians over rounds)."""
    lvs = lvs if lvs is not None else levels(res)
    big = res["label"] != "demo" and not res["label"].startswith("demo ")
    out = []
    lv16, lv1 = lvs.get(16, {}), lvs.get(1, {})
    r16 = lv16.get("ratios", {})
    if r16.get("vs_mlx_lm"):
        want = 1.3 if big else 1.5
        x = statistics.median(r16["vs_mlx_lm"])
        out.append(f"16 streams aggregate tok/s ≥ {want}× mlx_lm.server: {spread(r16['vs_mlx_lm'])} — {_met(x >= want)}")
    if big and r16.get("vs_ceiling"):
        x = statistics.median(r16["vs_ceiling"])
        out.append(f"16 streams aggregate tok/s ≥ 0.9× the ceiling: {spread(r16['vs_ceiling'])} — {_met(x >= 0.9)}")
    m16 = lv16.get("mlxtg")
    if m16 and m16.get("step_ms", 0) == m16.get("step_ms", 0):
        step = m16["step_ms"]
        ok = step > 0.5 and 0.5 * step <= m16["stream_gap_max_ms"] <= 1.5 * step
        out.append(f"16 streams, each stream's median chunk gap ≈ one step ({f(step)} ms): "
                   f"{f(m16['stream_gap_p50_ms'])} ms median, {f(m16['stream_gap_max_ms'])} ms worst stream "
                   f"(within 0.5–1.5 steps) — {_met(ok)}")
        out.append(f"16 streams, chunk gap p95 ≤ 2× step: {f(m16['gap_p95_ms'])} ms vs {f(2 * step)} ms — "
                   f"{_met(step > 0.5 and m16['gap_p95_ms'] <= 2 * step)}")
        if lv16.get("mlx_lm"):
            ref = lv16["mlx_lm"]["ttft_p50"]
            out.append(f"16 streams TTFT p50 ≤ mlx_lm.server's: {f(m16['ttft_p50'], '.0f')} vs {f(ref, '.0f')} ms — "
                       f"{_met(m16['ttft_p50'] <= ref)}")
    r1 = lv1.get("ratios", {})
    if r1.get("decode_vs_mlx_lm"):
        x = statistics.median(r1["decode_vs_mlx_lm"])
        bursty = [k for k in ("mlxtg", "mlx_lm") if (lv1.get(k, {}).get("step_ms") or 0) < 0.5]
        verdict = (f"**not measurable**: {', '.join(bursty)} sent its tokens in bursts (median chunk gap < 0.5 ms)"
                   if bursty else _met(x >= 0.95))
        out.append(f"1 stream decode rate ≥ 0.95× mlx_lm.server: {spread(r1['decode_vs_mlx_lm'], '.3f')} — {verdict}")
    refs = res.get("single_ref") or []
    if refs and lv1.get("mlxtg"):
        pre = statistics.median(r["prefill_ms"] for r in refs)
        ttft = lv1["mlxtg"]["ttft_p50"]
        out.append(f"1 stream TTFT p50 − in-process prefill ({refs[0]['prompt_tokens']}-token prompt) ≤ 5 ms: "
                   f"{ttft:.1f} − {pre:.1f} = {ttft - pre:.1f} ms — {_met(ttft - pre <= 5.0)}")
        step = statistics.median(r["step_mean_ms"] for r in refs)
        out.append(f"(for reference: mlxtg 1-stream step {f(lv1['mlxtg']['step_ms'])} ms vs in-process decode step "
                   f"{step:.1f} ms; mlx_lm.server TTFT p50 {f(lv1.get('mlx_lm', {}).get('ttft_p50'), '.1f')} ms)")
    return out


def blas_compare(results: list[dict[str, Any]]) -> list[str]:
    fast = next((r for r in results if r["label"] == "demo"), None)
    slow = next((r for r in results if r["label"].startswith("demo (no")), None)
    if not fast or not slow:
        return []
    a_l, b_l = levels(fast), levels(slow)
    rows = ["| c | system | OpenBLAS | mlx bundled BLAS | speed-up |", "|---:|---|---:|---:|---:|"]
    for c, lv in b_l.items():
        for key in (*SERVERS, "ceiling"):
            a, b = a_l.get(c, {}).get(key), lv.get(key)
            if a and b and b["agg_tps"]:
                rows.append(f"| {c} | {NAMES[key].strip('*')} | {a['agg_tps']:.1f} | {b['agg_tps']:.1f} | "
                            f"{a['agg_tps'] / b['agg_tps']:.1f}× |")
    return rows


METHOD = (
    "Method: for each concurrency c, c streaming `/v1/chat/completions` requests are sent at once "
    "(distinct prompts whose first words differ, chat template applied by each server, temperature 0, "
    "`logit_bias` −100 on every EOS id so each request generates exactly `max_tokens`; the same body "
    "goes to every server, except `model`). Rounds: {rounds}; in each round every level is measured on "
    "every system, and the order of the systems rotates from round to round so none always goes first; "
    "c = 1 is {single} sequential requests per round. Shown: medians over rounds; a ratio is taken "
    "within a round and given as median (min–max). **agg tok/s** = completion tokens / (last token − "
    "first send). **decode tok/s per stream** = mean over streams of (tokens − 1) / (last − first "
    "content chunk). **TTFT** = send → first non-empty content chunk. **step** = median of all chunk "
    "gaps (steady-state step time); **stream median gap** = each stream's own median gap (median and "
    "worst stream); both ≈ 0 means tokens arrive in bursts. The **ceiling** is mlx-lm's "
    "`BatchGenerator` in a subprocess on the same token ids (prefill and completion batch = c, no stop "
    "tokens, no logits processors): its TTFT is the batched prefill, its per-stream rate its "
    "decode-only rate / c. The in-process prefill of the 1-stream target is one batch-1 forward + "
    "argmax of the same prompt in that subprocess. mlx_lm.server runs with `--decode-concurrency "
    "{mb} --prompt-concurrency {mb}`, mlxtg with `--max-batch {mb}`; every server gets one warm-up "
    "request. A request whose connection drops before any response byte is retried at once (up to 3 "
    "times; TTFT counts from the first attempt). CPU cores: used by the system under test (its process "
    "tree) and by everything else (other people's jobs; the benchmark client excluded) — the machine "
    "is shared, so read rows with a high second number with care."
)


def render_section(report: dict[str, Any]) -> str:
    m = report["machine"]
    L = [HEADING, "",
         f"Command: `{report['command']}` (from the repository root; `make bench` runs the same). "
         f"Date: {report['date']}. Wall time: {report['wall_s'] / 60:.1f} min.", "",
         f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}. Python {m['python']}, "
         f"mlx {m['mlx']}, mlx-lm {m['mlx_lm']}, mlxtg {m['mlxtg']}. BLAS: {m['openblas'] or 'none found'} "
         "preloaded (LD_PRELOAD) into every MLX process for the OpenBLAS runs (mlxtg's supervisor preloads "
         "it into its workers; the other servers and the ceiling get the same LD_PRELOAD).", "",
         f"Load average at start: {report['load_start']}. Other busy processes at start: "
         + ("; ".join(f"`{p}`" for p in report["busy_start"]) or "none") + ".", "",
         METHOD.format(rounds=report["rounds"], single=report["single_repeats"], mb=report["max_batch"]), ""]
    for res in report["results"]:
        lvs = levels(res)
        params = res.get("params")
        shown = os.path.relpath(res["model"], ROOT) if str(res["model"]).startswith(str(ROOT)) else res["model"]
        L += [f"### {res['label']}: `{shown}`" + (f" ({params / 1e6:.1f} M params)" if params else "")
              + f", max_tokens {res['max_tokens']}", ""]
        ci = res.get("ceiling_info", {})
        claim = res.get("servers", {}).get("mlxtg", {}).get("worker_facts", {}).get("blas")
        L += ["BLAS actually mapped (from /proc/PID/maps): "
              + ", ".join(f"{k}: {v.get('blas_in_use', '?')}" + (f" (its worker reports \"{claim}\")"
                          if k == "mlxtg" and claim else "") for k, v in res.get("servers", {}).items())
              + (f", ceiling: {ci.get('blas')} (1024² matmul {ci.get('matmul_gflops', 0):.1f} GFLOP/s)" if ci else "")
              + f". Prompt tokens: {res.get('prompt_tokens_range') or '—'}.", ""]
        L += level_table(lvs) + [""]
        L += [f"- {t}" for t in targets(res, lvs)] + [""]
    if report.get("blas_compare"):
        L += ["### With and without OpenBLAS (demo model, aggregate tok/s)", "", *report["blas_compare"], ""]
    L += ["### Notes", ""] + [f"- {n}" for n in auto_notes(report) + report.get("notes", [])]
    if report["incidents"]:
        L += ["", "Incidents recorded during the run:", "", "```",
              *[i for inc in report["incidents"] for i in inc.splitlines()], "```"]
    if report.get("chart"):
        L += ["", "![aggregate decode tokens/s vs concurrency](serving.png)"]
    return "\n".join(L) + "\n"


def auto_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    if report.get("quiet_waited_s"):
        notes.append(f"Waited {report['quiet_waited_s']:.0f}s in total for other jobs to quieten before "
                     "measurements (--quiet-threshold / --quiet-wait / --quiet-budget).")
    for res in report["results"]:
        noisy = [f"c={c} {k} ({v['cpu_other']:.2f})" for c, lv in levels(res).items()
                 for k, v in lv.items() if k != "ratios" and (v.get("cpu_other") or 0) > 0.5]
        if noisy:
            notes.append(f"{res['label']}: other jobs used > 0.5 cores (median over rounds) during "
                         + ", ".join(noisy) + " — those rows measure contention as much as the servers.")
        bursts = [f"c={c} {k} ({v['step_ms']:.1f} ms)" for c, lv in levels(res).items() for k, v in lv.items()
                  if k in SERVERS and (v.get("step_ms") or 0) < 0.5]
        if bursts:
            notes.append(f"{res['label']}: tokens reached the client in bursts (median chunk gap < 0.5 ms) for "
                         + ", ".join(bursts) + ", so those rows' per-stream rate is not a decode rate.")
        pc = res.get("mlxtg_prefix_cache")
        if pc:
            notes.append(f"{res['label']}: mlxtg prefix cache at the end: {pc.get('hits')} hits, "
                         f"{pc.get('hit_tokens')} tokens reused, {pc.get('misses')} misses.")
    if any("vllm_mlx" in r.get("servers", {}) for r in report["results"]):
        notes.append("vllm-mlx 0.6.0 (own venv, `--continuous-batching`) ignores `logit_bias` in its batched "
                     "engine (its simple engine honours it), so its requests can stop at EOS before max_tokens "
                     "(counted in the 'wrong counts' column): compare its rates with care.")
    notes.append("Every prompt opens its system message with its own number, so the prompts share only "
                 "`<|im_start|>system\\nNote ` (below mlxtg's 16-token minimum) and no server can skip "
                 "prefill work the ceiling does.")
    return notes


def write_results(path: Path, section: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), leaving the rest alone."""
    replace_section(path, HEADING, section)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in results if not r["label"].startswith("demo (no")]
    if not main:
        return
    fig, axes = plt.subplots(1, len(main), figsize=(6 * len(main), 4.5), squeeze=False)
    style = {"mlxtg": ("tab:blue", "o"), "mlx_lm": ("tab:orange", "s"), "vllm_mlx": ("tab:red", "D"),
             "ceiling": ("tab:green", "^")}
    for ax, res in zip(axes[0], main, strict=True):
        lvs = levels(res)
        cs = sorted(lvs)
        for key, (color, marker) in style.items():
            pts = [(c, lvs[c][key]) for c in cs if key in lvs[c]]
            if pts:
                xs = [c for c, _ in pts]
                ys = [v["agg_tps"] for _, v in pts]
                lo = [y - min(v["agg_all"]) for y, (_, v) in zip(ys, pts, strict=True)]
                hi = [max(v["agg_all"]) - y for y, (_, v) in zip(ys, pts, strict=True)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, color=color, capsize=3,
                            label=NAMES[key].strip("*"))
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs)
        ax.set_xticklabels([str(c) for c in cs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens/s (median, min–max over rounds)")
        p = res.get("params")
        ax.set_title(f"{res['label']} model" + (f" ({p / 1e6:.3g} M params)" if p else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Aggregate decode tokens/s, streaming chat completions (shared CPU; see RESULTS.md)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
