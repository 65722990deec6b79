"""Agent-workload prompt-cache benchmark: mlxtg vs mlx_lm.server.

    python -m bench.bench_agent                          # demo model + a bigger random Llama
    python -m bench.bench_agent --model PATH [--turns 10]
    python -m bench.bench_agent --models demo --turns 3 --no-probe --no-write   # smoke test

Two agents (A and B, different system prompts and tool lists rendered into the system turn)
hold a conversation of `--turns` turns each, interleaved turn by turn (A1, B1, A2, B2, ...).
Every turn appends the previous assistant reply (the server's actual reply, max_tokens 32,
temperature 0) and one new user or tool message. mlxtg and mlx_lm.server (same model, same
BLAS) run side by side; each request goes to mlxtg, then the same step to mlx_lm.server, so
background load hits both alike. Each server continues its own conversation with its own
replies (the request bodies stay identical as long as the two servers' replies agree; how
many were identical is reported).

Per request: TTFT (streaming, send -> first streamed chunk of the reply, i.e. the first
token; the first chunk with non-blank content is recorded too, since mlxtg holds back
whitespace and tool-call tags), prompt tokens and cached tokens as each server reports them
(`usage.prompt_tokens_details.cached_tokens`; mlxtg also its `x-mlxtg-cache` header).
Prefill computed = prompt - cached; for mlxtg it is cross-checked against the worker's
`prompt_tokens_computed` counter.

Then both servers are restarted (mlxtg with the same MLXTG_HOME, so its disk tier persists)
and the same request bodies are replayed. Finally a probe on mlxtg alone: cold TTFT of the
long prefix (fresh MLXTG_HOME), warm TTFT (RAM hit, only the user message new), and after
a restart the disk-tier TTFT with the cold TTFT of exactly that prompt on a fresh home,
plus the worker's own `disk_cache.load_seconds`; then a check that
`POST /admin/cache/clear` right after a request leaves the server up.

Writes `bench/RESULTS-agent.md` (hand-written notes below its notes marker are kept) and
`bench/out/agent.json`; prints the tables. `--from-json bench/out/agent.json` re-renders a
saved run. The run first waits for other benchmarks' servers to finish (`--wait-quiet`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_agent.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.agent_probe import mlxtg_probe, warmup  # noqa: E402
from bench.agent_report import RESULTS, now_str, write_report  # noqa: E402
from bench.agent_scenario import (  # noqa: E402
    REQ_TIMEOUT,
    SYSTEM_TOKENS,
    Tok,
    assistant_message,
    base_body,
    make_agents,
    next_messages,
    script,
)
from bench.common import (  # noqa: E402
    DEMO_MODEL,
    OUT,
    find_openblas,
    loadavg,
    log,
    machine_info,
    others_running,
    wait_quiet,
)
from bench.models import AGENT_BIG, ensure_llama  # noqa: E402
from bench.servers import MlxLmServer, Mlxtg, Server  # noqa: E402
from bench.streams import Reply, stream_chat  # noqa: E402


# -- one model ------------------------------------------------------------------------------------
@dataclass
class Rec:
    phase: str
    server: str
    agent: str
    turn: int
    idx: int  # position in the interleaved order, 0-based
    body: dict[str, Any]
    reply: Reply
    expect: str = ""
    note: str = ""


def run_conversations(
    client: Any,
    servers: list[Server],
    agents: dict[str, dict[str, Any]],
    turns: int,
    phase: str,
    replay: dict[str, list[dict[str, Any]]] | None = None,
) -> list[Rec]:
    """The interleaved A1, B1, A2, ... order; each step goes to every server in turn. With
    `replay`, the recorded bodies are sent again instead of being built from replies."""
    recs: list[Rec] = []
    convo = {(s.name, a): None for s in servers for a in agents}  # message lists
    last: dict[tuple[str, str], Reply | None] = {(s.name, a): None for s in servers for a in agents}
    scripts = {a: script(a, turns) for a in agents}
    idx = 0
    for t in range(1, turns + 1):
        for a in agents:
            for s in servers:
                if replay is not None:
                    body = replay[s.name][idx]
                else:
                    k = (s.name, a)
                    if convo[k] is None:
                        convo[k] = base_body(s.model_field, agents[a], f"agent-{a}")
                    else:
                        convo[k]["messages"].append(assistant_message(last[k]))  # type: ignore[arg-type]
                    role, content = scripts[a][t - 1]
                    convo[k]["messages"] += next_messages(last[k], role, content, a, t)
                    body = json.loads(json.dumps(convo[k]))
                rep = stream_chat(client, s.base + "/v1/chat/completions", body, REQ_TIMEOUT)
                recs.append(Rec(phase, s.name, a, t, idx, body, rep))
                last[(s.name, a)] = rep
                if not rep.ok:
                    log(f"  {phase} {s.name} {a}{t}: ERROR {rep.error}")
                    if isinstance(s, Server):
                        log(f"  server log tail:\n{s.tail(15)}")
                else:
                    log(
                        f"  {phase} {s.name:<13} {a}{t:<2} prompt {rep.prompt_tokens:>5} "
                        f"cached {str(rep.cached_tokens):>5}  ttft {rep.ttft * 1e3:8.1f} ms  "
                        f"{rep.cache_header or ''}"
                    )
            idx += 1
    return recs


BOUNDARY = 4  # tokens the next prompt may re-tokenize differently where the reply was appended


def check_expectations(recs: list[Rec], phase: str) -> None:
    """Mark mlxtg requests whose cache result is not what its design promises: turn 1 after
    a restart should come from disk (whole 128-token blocks), every later turn should reuse
    the previous turn's prompt (up to a few tokens where the template joins the reply)."""
    by = {(r.server, r.agent, r.turn): r for r in recs}
    for r in recs:
        if r.server != "mlxtg" or not r.reply.ok:
            continue
        rep = r.reply
        cached = rep.cached_tokens or 0
        prev = by.get((r.server, r.agent, r.turn - 1))
        if r.turn == 1 and phase == "fresh":
            r.expect = "miss (first turn)"
        elif r.turn == 1:
            want = min((rep.prompt_tokens or 0) // 128 * 128, (rep.prompt_tokens or 1) - 1)
            r.expect = f"disk >= {want}"
            if cached < want:
                r.note = "UNEXPECTED: less than the disk tier should hold"
        else:
            want = prev.reply.prompt_tokens if prev and prev.reply.ok else None
            if want is None:
                continue
            r.expect = f"ram/disk >= {want - BOUNDARY}"
            if cached < want - BOUNDARY:
                r.note = "UNEXPECTED: previous prompt not reused"


def summarize(recs: list[Rec], server: str, phase: str, counter: int | None) -> dict[str, Any]:
    rs = [r for r in recs if r.server == server and r.phase == phase]
    ok = [r for r in rs if r.reply.ok]
    prompt = sum(r.reply.prompt_tokens or 0 for r in ok)
    cached = sum(r.reply.cached_tokens or 0 for r in ok)
    reported = all(r.reply.cached_tokens is not None for r in ok)
    ttft = [r.reply.ttft for r in ok if r.reply.ttft is not None]
    return {
        "requests": len(rs),
        "ok": len(ok),
        "errors": [r.reply.error for r in rs if not r.reply.ok],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_reported": reported,
        "computed": prompt - cached,
        "computed_counter": counter,
        "computed_pct": (prompt - cached) / prompt if prompt else float("nan"),
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_sum": sum(ttft),
        "ttft_t1": [r.reply.ttft for r in ok if r.turn == 1],
        "hits": sum(1 for r in ok if (r.reply.cached_tokens or 0) > 0),
        "t1_computed_pct": (lambda p1, c1: (p1 - c1) / p1 if p1 else float("nan"))(
            sum(r.reply.prompt_tokens or 0 for r in ok if r.turn == 1),
            sum(r.reply.cached_tokens or 0 for r in ok if r.turn == 1),
        ),
        "ttft_content_p50": statistics.median(
            [r.reply.ttft_content for r in ok if r.reply.ttft_content is not None] or [float("nan")]
        ),
    }


def run_model(
    label: str, model: Path, turns: int, blas: str | None, probe_rounds: int, keep: bool
) -> dict[str, Any]:
    import httpx

    tok = Tok(model)
    target = SYSTEM_TOKENS.get(label, 2000)
    agents = make_agents(tok, target)
    for a, ag in agents.items():
        log(
            f"[{label}] agent {a}: system turn {ag['system_tokens']} tokens "
            f"(tools {ag['tools_tokens']})"
        )
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-agent-{label}-"))
    home = workdir / "home-agent"
    res: dict[str, Any] = {
        "label": label,
        "model": str(model),
        "workdir": str(workdir),
        "agents": {
            a: {k: v for k, v in ag.items() if k != "tools"}
            | {"tool_names": [t["function"]["name"] for t in ag["tools"]]}
            for a, ag in agents.items()
        },
    }
    mx = Mlxtg(model, blas, workdir, home=home)
    ml = MlxLmServer(model, blas, workdir, log_level="INFO")
    servers: list[Server] = [mx, ml]
    recs: list[Rec] = []
    client = httpx.Client(timeout=httpx.Timeout(REQ_TIMEOUT, connect=10.0))
    t_model = time.perf_counter()
    try:
        counters: dict[str, int | None] = {}
        replay: dict[str, list[dict[str, Any]]] = {}
        for phase in ("fresh", "restart"):
            for s in servers:
                s.start()
                res.setdefault("warmup_ttft", {}).setdefault(phase, {})[s.name] = warmup(client, s)
            res.setdefault("blas", {}).update({s.name: s.blas_in_use() for s in servers})
            res.setdefault("load_before", {})[phase] = loadavg()
            st0 = mx.settled_stats()
            if phase == "restart":
                res["disk_before_restart_phase"] = st0.get("disk_cache")
            log(f"[{label}] phase {phase}: {2 * turns} requests per server")
            t0 = time.perf_counter()
            got = run_conversations(
                client, servers, agents, turns, phase, replay if phase == "restart" else None
            )
            res.setdefault("phase_wall_s", {})[phase] = time.perf_counter() - t0
            st1 = mx.settled_stats()
            counters[phase] = (st1.get("prompt_tokens_computed") or 0) - (
                st0.get("prompt_tokens_computed") or 0
            )
            res.setdefault("mlxtg_stats", {})[phase] = st1
            check_expectations(got, phase)
            recs += got
            if phase == "fresh":
                for s in servers:
                    replay[s.name] = [r.body for r in got if r.server == s.name]
            for s in servers:
                s.stop()
        res["counters"] = counters
        res["start_s"] = {s.name: s.start_s for s in servers}
        # Same requests on both servers?
        a = [r.body for r in recs if r.phase == "fresh" and r.server == "mlxtg"]
        b = [r.body for r in recs if r.phase == "fresh" and r.server == "mlx_lm.server"]
        strip = lambda x: {k: v for k, v in x.items() if k != "model"}  # noqa: E731
        res["identical_bodies"] = sum(strip(x) == strip(y) for x, y in zip(a, b, strict=False))
        pa = [r.reply.prompt_tokens for r in recs if r.phase == "fresh" and r.server == "mlxtg"]
        pb = [r.reply.prompt_tokens for r in recs if r.phase == "fresh" and r.server != "mlxtg"]
        res["same_prompt_tokens"] = sum(x == y for x, y in zip(pa, pb, strict=False))
        if probe_rounds > 0:
            log(f"[{label}] probe: cold / warm / disk TTFT on the agent A prefix (mlxtg)")
            params = json.loads((model / "config.json").read_text()).get("bench_params") or 0
            attempts = 1 if params > 50e6 else 3  # each attempt after the first is a cold prefill
            res["probe"] = mlxtg_probe(
                client, model, blas, workdir, agents["A"], probe_rounds, attempts
            )
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        log(f"[{label}] FAILED: {exc}")
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
        client.close()
    res["wall_s"] = time.perf_counter() - t_model
    res["records"] = [
        {
            "phase": r.phase,
            "server": r.server,
            "agent": r.agent,
            "turn": r.turn,
            "idx": r.idx,
            "expect": r.expect,
            "note": r.note,
            "reply": asdict(r.reply),
            "n_messages": len(r.body.get("messages", [])),
        }
        for r in recs
    ]
    res["summary"] = {
        f"{s}/{p}": summarize(recs, s, p, res.get("counters", {}).get(p) if s == "mlxtg" else None)
        for s in ("mlxtg", "mlx_lm.server")
        for p in ("fresh", "restart")
    }
    # Evidence for anything unexpected: request, response, header, server log.
    issues = []
    for r in recs:
        if r.note or not r.reply.ok:
            issues.append(
                {
                    "phase": r.phase,
                    "server": r.server,
                    "req": f"{r.agent}{r.turn}",
                    "note": r.note or "error",
                    "expect": r.expect,
                    "header": r.reply.cache_header,
                    "usage": r.reply.raw_usage,
                    "error": r.reply.error,
                    "last_messages": r.body["messages"][-3:],
                }
            )
    res["issues"] = issues
    if issues:
        for name in ("mlxtg.log", "mlx_lm.server.log"):
            p = workdir / name
            with contextlib.suppress(OSError):
                res.setdefault("log_tails", {})[name] = p.read_text(errors="replace")[-6000:]
        with contextlib.suppress(OSError):
            for lp in sorted(home.rglob("*.log")):
                res.setdefault("log_tails", {})[str(lp.relative_to(workdir))] = lp.read_text(
                    errors="replace"
                )[-6000:]
    pr = res.get("probe") or {}
    probe_bad = "error" in pr or not (pr.get("clear_check") or {"ok": True})["ok"]
    if not keep and not issues and not probe_bad and "error" not in res:
        shutil.rmtree(workdir, ignore_errors=True)
        res["workdir_removed"] = True
    return res


def snapshot_demo(dst_root: Path) -> Path:
    """A private copy of the demo model (it may be retrained while this runs)."""
    from bench.models import wait_for_model

    if not wait_for_model(DEMO_MODEL, 1800, log):
        raise RuntimeError(f"no complete model at {DEMO_MODEL}")
    time.sleep(2)
    dst = dst_root / "model"
    shutil.copytree(DEMO_MODEL, dst)
    return dst


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_agent", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--model",
        help="one model folder (default: the demo model and the bigger random-weight Llama)",
    )
    ap.add_argument("--models", default="demo,big", help="with no --model: demo, big or both")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument(
        "--probe-rounds", type=int, default=2, help="samples per probe measurement (0: no probe)"
    )
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument(
        "--system-tokens",
        type=int,
        help="size of the system turn (default: 1200 for the demo model, 2000 otherwise)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only; keep RESULTS-agent.md")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs (homes, logs)")
    ap.add_argument("--no-blas", action="store_true", help="MLX's bundled BLAS")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=7200.0,
        metavar="S",
        help="wait up to S seconds for other servers / trainings to finish first",
    )
    ap.add_argument("--from-json", metavar="PATH", help="only re-render a saved run's report")
    a = ap.parse_args(argv)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        text = write_report(
            saved["results"],
            saved["argv"],
            saved["wall_s"],
            saved["machine"],
            not a.no_write,
            saved.get("date"),
        )
        print(text)
        return 0
    t0 = time.perf_counter()
    info = machine_info()
    blas = None if a.no_blas else find_openblas()
    OUT.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, Path]] = []
    if a.model:
        p = Path(a.model).resolve()
        plan.append(("demo" if p == DEMO_MODEL.resolve() else p.name, p))
    else:
        for m in a.models.split(","):
            if m == "demo":
                plan.append(("demo", DEMO_MODEL))
            elif m == "big":
                plan.append(("big", ensure_llama(AGENT_BIG, DEMO_MODEL, log=log)))
    results = []
    snap_root = Path(tempfile.mkdtemp(prefix="bench-agent-models-"))
    try:
        for label, path in plan:
            if a.system_tokens:
                SYSTEM_TOKENS[label] = a.system_tokens
            busy = wait_quiet(a.wait_quiet)
            shown = path
            if label == "demo":
                path = snapshot_demo(snap_root)
            log(f"== {label}: {shown} (load {loadavg()})")
            res = run_model(label, path, a.turns, blas, 0 if a.no_probe else a.probe_rounds, a.keep)
            res["model"] = str(shown) + (" (private copy taken at start)" if path != shown else "")
            res["others_at_start"] = busy + [
                x for x in others_running(load_too=True) if x not in busy
            ]
            res["others_at_end"] = others_running(load_too=True)
            with contextlib.suppress(Exception):
                res["weights_sha256"] = sha256_file(path / "model.safetensors")
                res["params"] = json.loads((path / "config.json").read_text()).get("bench_params")
            results.append(res)
    finally:
        shutil.rmtree(snap_root, ignore_errors=True)
    wall = time.perf_counter() - t0
    (OUT / "agent.json").write_text(
        json.dumps(
            {"argv": argv, "date": now_str(), "machine": info, "wall_s": wall, "results": results},
            indent=1,
            default=str,
        )
    )
    text = write_report(results, argv, wall, info, not a.no_write, now_str())
    print(text)
    log(
        f"wall time {wall:.0f}s; wrote {'nothing' if a.no_write else RESULTS} and {OUT / 'agent.json'}"
    )
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
