"""The report of `bench.bench_agent`: bench/RESULTS-agent.md from a run's results."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shlex
import statistics
from typing import Any

from bench.agent_scenario import MAX_TOKENS, SYSTEM_TOKENS, TARGETS
from bench.common import ROOT

RESULTS = ROOT / "bench" / "RESULTS-agent.md"
NOTES_MARK = "<!-- notes: kept when the benchmark rewrites this file -->"


# -- report ---------------------------------------------------------------------------------------
def now_str() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _ms(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x * 1e3:.0f}"


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f} %"


def _met(ok: bool | None) -> str:
    return "reference" if ok is None else ("**met**" if ok else "**not met**")


def _med(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def render_model(res: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    L: list[str] = []
    targets: list[dict[str, Any]] = []
    label = res["label"]
    L.append(f"### {label}: `{res['model']}`")
    L.append("")
    ags = res.get("agents", {})
    L.append(
        "System turn (system prompt + tools rendered by the chat template): "
        + ", ".join(
            f"agent {a} {ag['system_tokens']} tokens (of which tools {ag['tools_tokens']}, "
            f"{len(ag['tool_names'])} tools)"
            for a, ag in ags.items()
        )
        + "."
    )
    if res.get("params"):
        L.append(f"Parameters: {res['params'] / 1e6:.1f} M (fp32).")
    L.append(
        f"BLAS in the MLX processes: {res.get('blas')}. Load average before each phase: "
        f"{res.get('load_before')}. Server start to ready (s): "
        + ", ".join(
            f"{k} {[round(x, 1) for x in v]}" for k, v in (res.get("start_s") or {}).items()
        )
        + "."
    )
    for key, when in (("others_at_start", "at the start"), ("others_at_end", "at the end")):
        if res.get(key):
            L.append(
                f"Other processes on the machine {when} (load they add is shared by both "
                "servers): " + "; ".join(f"`{x}`" for x in res[key]) + "."
            )
    if "identical_bodies" in res:
        n = len([r for r in res["records"] if r["phase"] == "fresh" and r["server"] == "mlxtg"])
        L.append(
            f"Request bodies identical on both servers: {res['identical_bodies']} of {n} "
            f"(each server continues with its own replies); same prompt token count: "
            f"{res['same_prompt_tokens']} of {n}."
        )
    if res.get("error"):
        L.append("")
        L.append(f"**Run failed**: `{res['error']}`")
    L.append("")
    L.append(
        "| system | phase | requests ok | prompt tokens (no-cache total) | cached (reported) "
        "| prefill computed | computed % | mlxtg counter | turn 1 computed % | TTFT p50 ms "
        "| TTFT sum s | turn-1 TTFT ms (A, B) | first non-blank content p50 ms |"
    )
    L.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    sm = res.get("summary", {})
    for key in ("mlxtg/fresh", "mlx_lm.server/fresh", "mlxtg/restart", "mlx_lm.server/restart"):
        s = sm.get(key)
        if not s or not s["requests"]:
            continue
        srv, ph = key.split("/")
        ph_name = "first run" if ph == "fresh" else "after restart"
        L.append(
            f"| {srv} | {ph_name} | {s['ok']}/{s['requests']} | {s['prompt_tokens']} | "
            f"{s['cached_tokens']}{'' if s['cached_reported'] else ' (not reported)'} | "
            f"{s['computed']} | {_pct(s['computed_pct'])} | "
            f"{s['computed_counter'] if s['computed_counter'] is not None else '—'} | "
            f"{_pct(s['t1_computed_pct'])} | {_ms(s['ttft_p50'])} | {s['ttft_sum']:.2f} | "
            f"{', '.join(_ms(x) for x in s['ttft_t1'])} | {_ms(s['ttft_content_p50'])} |"
        )
    L.append("")
    recs = res.get("records", [])
    if recs:
        turns = sorted({r["turn"] for r in recs})
        L.append(
            "Per turn (p50 over agents A and B): TTFT in ms, and prompt / cached tokens (A + B)."
        )
        L.append("")
        L.append(
            "| turn | prompt tok | mlxtg cached | mlxtg TTFT | mlx_lm cached | mlx_lm TTFT "
            "| after restart: mlxtg cached | mlxtg TTFT | mlx_lm cached | mlx_lm TTFT |"
        )
        L.append("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for t in turns:

            def g(srv: str, ph: str, t: int = t) -> list[dict[str, Any]]:
                return [
                    r["reply"]
                    for r in recs
                    if r["server"] == srv
                    and r["phase"] == ph
                    and r["turn"] == t
                    and r["reply"]["ok"]
                ]

            row = [str(t), str(sum(x["prompt_tokens"] or 0 for x in g("mlxtg", "fresh")))]
            for ph in ("fresh", "restart"):
                for srv in ("mlxtg", "mlx_lm.server"):
                    xs = g(srv, ph)
                    row.append(str(sum(x["cached_tokens"] or 0 for x in xs)) if xs else "—")
                    row.append(_ms(_med([x["ttft"] for x in xs])))
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        L.append("<details><summary>Every request (mlxtg header, TTFT ms)</summary>")
        L.append("")
        L.append(
            "| phase | req | prompt | mlxtg cached | x-mlxtg-cache | mlxtg TTFT (content) | "
            "mlx_lm cached | mlx_lm TTFT (content) | expected (mlxtg) | note |"
        )
        L.append("|---|---|--:|--:|---|--:|--:|--:|---|---|")
        for ph in ("fresh", "restart"):
            for r in [r for r in recs if r["phase"] == ph and r["server"] == "mlxtg"]:
                o = next(
                    (
                        x
                        for x in recs
                        if x["phase"] == ph and x["server"] != "mlxtg" and x["idx"] == r["idx"]
                    ),
                    None,
                )
                rp, op = r["reply"], (o["reply"] if o else {})
                L.append(
                    f"| {ph} | {r['agent']}{r['turn']} | {rp['prompt_tokens']} | "
                    f"{rp['cached_tokens']} | `{rp['cache_header']}` | {_ms(rp['ttft'])} "
                    f"({_ms(rp['ttft_content'])}) | {op.get('cached_tokens')} | "
                    f"{_ms(op.get('ttft'))} ({_ms(op.get('ttft_content'))}) | {r['expect']} | "
                    f"{r['note'] or ('ERROR ' + str(rp['error']) if not rp['ok'] else '')} |"
                )
        L.append("")
        L.append("</details>")
        L.append("")
    # Targets from the conversations.
    for ph, tkey, what in (
        ("fresh", "computed", "prefill computed ≤ 15 % of the no-cache total"),
        ("restart", "restart", "after restart ≤ 20 % of the no-cache total"),
    ):
        for srv in ("mlxtg", "mlx_lm.server"):
            s = sm.get(f"{srv}/{ph}")
            if s and s["prompt_tokens"]:
                targets.append(
                    {
                        "model": label,
                        "system": srv,
                        "target": what,
                        "value": _pct(s["computed_pct"])
                        + (f" (turn 1: {_pct(s['t1_computed_pct'])})" if ph == "restart" else ""),
                        "met": (s["computed_pct"] <= TARGETS[tkey] and s["ok"] == s["requests"])
                        if srv == "mlxtg"
                        else None,
                    }
                )
    pr = res.get("probe")
    if pr:
        cold_all = [*pr["cold"], *pr["cold_same"]]
        cold = _med(cold_all)
        warm = _med(pr["warm"])
        disk = _med([d["ttft"] for d in pr["disk"]])
        cold_same = _med(pr["cold_same"])
        load = _med([d["load_s"] for d in pr["disk"]])
        pairs = [
            (d["ttft"], c)
            for d, c in zip(pr["disk"], pr["cold_same"], strict=False)
            if d["ttft"] and c
        ]
        load_pairs = [
            (d["load_s"], c)
            for d, c in zip(pr["disk"], pr["cold_same"], strict=False)
            if d["load_s"] and c
        ]
        disk_ratio = _med([a / b for a, b in pairs])
        load_ratio = _med([a / b for a, b in load_pairs])
        n_pre = ags.get("A", {}).get("system_tokens")
        L.append(
            f"Probe on mlxtg alone: agent A's prefix ({n_pre} tokens of system prompt + tools) "
            "and a new user message. Cold = first request on a server with a fresh MLXTG_HOME "
            "(after one short unrelated warm-up request; `POST /admin/cache/clear` is not used "
            "for this, see the clear check below). Warm = the same prefix with another user "
            "message right after (RAM hit). Disk = first request after restarting on the home "
            "that holds the prefix (after the warm-up); its cold twin is exactly that prompt on "
            "a fresh home. TTFT = first token."
        )
        L.append("")
        L.append("| measurement | samples (ms) | p50 ms | ratio |")
        L.append("|---|---|--:|--:|")
        fmt = lambda xs: ", ".join(_ms(x) for x in xs)  # noqa: E731
        L.append(f"| cold (all fresh-home first requests) | {fmt(cold_all)} | {_ms(cold)} | 1 |")
        L.append(
            f"| warm, RAM hit | {fmt(pr['warm'])} | {_ms(warm)} | "
            f"{(warm / cold) if warm and cold else float('nan'):.3f} × cold |"
        )
        L.append(
            f"| disk hit after restart | {fmt([d['ttft'] for d in pr['disk']])} | {_ms(disk)} "
            f"| {disk_ratio if disk_ratio else float('nan'):.3f} × its cold twin |"
        )
        L.append(
            f"| cold twin (same prompt, fresh home) | {fmt(pr['cold_same'])} | {_ms(cold_same)} "
            "| 1 |"
        )
        L.append(
            f"| worker's `disk_cache.load_seconds` for the disk hit | "
            f"{fmt([d['load_s'] for d in pr['disk']])} | {_ms(load)} | "
            f"{load_ratio if load_ratio else float('nan'):.3f} × its cold twin's TTFT |"
        )
        L.append("")
        for d in pr["disk"]:
            L.append(
                f"Disk hit: prompt {d['prompt']} tokens, cached {d['cached']}, computed "
                f"{d['computed']}, header `{d['header']}`."
            )
        if pr.get("error"):
            L.append(f"**Probe failed**: `{pr['error']}`")
        cc = pr.get("clear_check")
        if cc:
            L.append("")
            if cc["ok"]:
                L.append(
                    f"Clear check: `POST /admin/cache/clear` right after a request, "
                    f"{cc['attempts']} time(s) → 200, server still ready."
                )
            else:
                tail = "\n".join(
                    ln
                    for ln in (cc.get("log_tail") or "").splitlines()
                    if ln.strip() and not ln.startswith(("│", "╭", "╰"))
                )[-1500:]
                L.append(
                    f"**Clear check failed** (attempt {cc['attempts']}): `POST /admin/cache/clear` "
                    f"right after a request → "
                    f"status {cc['status']} (`{cc['body'][:120]}`), then `/ready` → "
                    f"`{cc['ready_after']}`, `mlxtg up` exit code {cc['exit_code']}. Log tail:"
                )
                L.append("")
                L.append("```")
                L.append(tail)
                L.append("```")
        L.append("")
        if warm and cold:
            targets.append(
                {
                    "model": label,
                    "system": "mlxtg",
                    "target": f"warm TTFT ≤ 0.1 × cold on the {n_pre}-token prefix",
                    "value": f"{warm / cold:.3f} ×",
                    "met": warm / cold <= TARGETS["warm"],
                }
            )
        if disk_ratio:
            targets.append(
                {
                    "model": label,
                    "system": "mlxtg",
                    "target": "disk slot load < 25 % of recomputing (TTFT disk hit / cold twin)",
                    "value": f"{100 * disk_ratio:.1f} %",
                    "met": disk_ratio < TARGETS["disk"],
                }
            )
        if load_ratio:
            targets.append(
                {
                    "model": label,
                    "system": "mlxtg",
                    "target": "disk slot load < 25 % of recomputing (worker load_seconds / cold twin TTFT)",
                    "value": f"{100 * load_ratio:.1f} %",
                    "met": load_ratio < TARGETS["disk"],
                }
            )
    if res.get("issues"):
        L.append(f"**{len(res['issues'])} unexpected result(s)** (request tail, header, usage):")
        L.append("")
        for i in res["issues"][:10]:
            L.append(
                f"- {i['phase']} {i['server']} {i['req']}: {i['note']}; expected {i['expect']}; "
                f"header `{i['header']}`; usage `{json.dumps(i['usage'])}`; error `{i['error']}`"
            )
        L.append("")
    return L, targets


def write_report(
    results: list[dict[str, Any]],
    argv: list[str],
    wall: float,
    info: dict[str, Any],
    write: bool,
    date: str | None = None,
) -> str:
    L = ["# Agent workload: prompt cache (mlxtg vs mlx_lm.server)", ""]
    L.append(
        f"Command: `{' '.join(['python -m bench.bench_agent', shlex.join(argv)]).strip()}` (run "
        "from the repository root with the project's venv)."
    )
    L.append(f"Date: {date or now_str()}; wall time {wall / 60:.1f} min.")
    L.append(
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, {info['os']}; "
        f"Python {info['python']}; mlx {info['mlx']}, mlx-lm {info['mlx_lm']}, mlxtg "
        f"{info['mlxtg']}; BLAS: {info['openblas'] or 'bundled'} (LD_PRELOAD for "
        "mlx_lm.server, mlxtg's own preload for its workers)."
    )
    L.append("")
    L.append(
        f"Workload: two agents interleaved turn by turn (A1, B1, A2, B2, ...), each with its own "
        f"system prompt and 8 tool JSON schemas (`tools` field, rendered into the system turn by "
        f"the chat template); each turn appends the server's actual previous reply "
        f"(max_tokens {MAX_TOKENS}, temperature 0, streaming, nothing banned) and a new user "
        "or tool message; `prompt_cache_key` = the agent. One short unrelated warm-up "
        "request per server start. Each step goes to mlxtg then to mlx_lm.server (both up "
        "the whole phase). Then both servers are restarted (mlxtg keeps its MLXTG_HOME, so the "
        "disk tier persists) and the same request bodies are replayed. TTFT = send → first "
        "streamed chunk of the reply (the first token: mlxtg sends the role chunk with it; "
        "mlx_lm.server its first content); 'first non-blank content' is also given, as "
        "mlxtg's tool-call parser holds back whitespace-only text. Prefill computed = prompt tokens − cached "
        "tokens as each server reports them (`usage.prompt_tokens_details.cached_tokens`; "
        "mlx_lm.server reports it too); the mlxtg counter column is the worker's own "
        "`prompt_tokens_computed` delta over the phase. Demo model: 2048-token context, so "
        f"its system turn is ~{SYSTEM_TOKENS['demo']} tokens; the bigger model uses "
        f"~{SYSTEM_TOKENS['big']}."
    )
    L.append("")
    all_targets: list[dict[str, Any]] = []
    for res in results:
        body, t = render_model(res)
        L += body
        all_targets += t
    if all_targets:
        L.append("### Targets")
        L.append("")
        L.append("| model | system | target | value | status |")
        L.append("|---|---|---|--:|---|")
        for t in all_targets:
            L.append(
                f"| {t['model']} | {t['system']} | {t['target']} | {t['value']} | {_met(t['met'])} |"
            )
        L.append("")
    text = "\n".join(L) + "\n"
    if write:
        notes = ""
        with contextlib.suppress(OSError):
            old = RESULTS.read_text()
            if NOTES_MARK in old:  # hand-written notes below the marker survive a rerun
                notes = old[old.index(NOTES_MARK) :]
        RESULTS.write_text(text + ("\n" + notes if notes else ""))
    return text


