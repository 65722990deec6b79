"""The mlxtg-only probe of `bench.bench_agent`: cold, warm (RAM) and disk-tier TTFT on one
agent's long prefix, and a check that `POST /admin/cache/clear` right after a request leaves
the server up."""

from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path
from typing import Any

from bench.agent_scenario import REQ_TIMEOUT, base_body
from bench.common import log
from bench.servers import Mlxtg, Server
from bench.streams import Reply, stream_chat


def mlxtg_probe(
    client: Any,
    model: Path,
    blas: str | None,
    workdir: Path,
    agent: dict[str, Any],
    rounds: int,
    clear_attempts: int = 3,
) -> dict[str, Any]:
    """Cold vs warm (RAM) vs disk TTFT on the agent's long prefix (system + tools).

    Cold = the first request on a server with a fresh MLXTG_HOME (after a short unrelated
    warm-up). Warm = the same prefix again with a new user message (RAM hit). Disk = the
    first request after restarting on the home that holds the prefix; its cold twin is the
    very same prompt on a fresh home. At the end, `POST /admin/cache/clear` on a server in
    the state that follows a disk hit, checking that the server survives it."""
    out: dict[str, Any] = {"cold": [], "warm": [], "disk": [], "cold_same": [], "events": []}
    homes = iter(range(100))
    srv: Mlxtg | None = None

    def start(home: Path) -> Mlxtg:
        nonlocal srv
        if srv is not None:
            srv.settled_stats()  # disk writes done before the restart
            srv.stop()
        srv = Mlxtg(model, blas, workdir, home=home, log_name="mlxtg-probe.log")
        srv.start()
        warmup(client, srv)
        return srv

    def fresh() -> Mlxtg:
        return start(workdir / f"home-probe-fresh{next(homes)}")

    def ask(s: Mlxtg, q: str, label: str) -> Reply:
        body = base_body(s.model_field, agent, "probe")
        body["messages"].append({"role": "user", "content": q})
        rep = stream_chat(client, s.base + "/v1/chat/completions", body, REQ_TIMEOUT)
        ev = {
            "label": label,
            "q": q,
            "ok": rep.ok,
            "error": rep.error,
            "ttft": rep.ttft,
            "ttft_content": rep.ttft_content,
            "prompt_tokens": rep.prompt_tokens,
            "cached_tokens": rep.cached_tokens,
            "header": rep.cache_header,
        }
        out["events"].append(ev)
        log(
            f"  probe {label:<10} prompt {rep.prompt_tokens} cached {rep.cached_tokens} "
            f"ttft {(rep.ttft or 0) * 1e3:8.1f} ms  {rep.cache_header}  {rep.error or ''}"
        )
        return rep

    keep_home = workdir / "home-probe"
    try:
        s = start(keep_home)
        rep = ask(s, "Probe question: what should I do first today?", "cold")
        out["cold"].append(rep.ttft if rep.ok else None)
        for i in range(rounds + 1):
            rep = ask(s, f"Warm question {i}: list the open tasks for this week.", "warm")
            out["warm"].append(rep.ttft if rep.ok else None)
        for i in range(rounds):
            s = start(keep_home)  # restart on the home holding the prefix
            st0 = s.settled_stats()
            q = f"After restart {i}: summarise the rules you follow."
            rep = ask(s, q, "disk")
            st1 = s.settled_stats()
            d0, d1 = st0.get("disk_cache") or {}, st1.get("disk_cache") or {}
            out["disk"].append(
                {
                    "ttft": rep.ttft if rep.ok else None,
                    "load_s": (d1.get("load_seconds") or 0.0) - (d0.get("load_seconds") or 0.0),
                    "cached": rep.cached_tokens,
                    "prompt": rep.prompt_tokens,
                    "header": rep.cache_header,
                    "computed": (st1.get("prompt_tokens_computed") or 0)
                    - (st0.get("prompt_tokens_computed") or 0),
                }
            )
            if i == rounds - 1:
                out["blas"] = s.blas_in_use()
                out["clear_check"] = clear_check(s, ask, clear_attempts)
            s2 = fresh()
            rep2 = ask(s2, q, "cold-same")
            out["cold_same"].append(rep2.ttft if rep2.ok else None)
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        log(f"probe failed: {exc}")
    finally:
        if srv is not None:
            srv.stop()
    with contextlib.suppress(OSError):
        out["log_tail"] = (workdir / "mlxtg-probe.log").read_text(errors="replace")[-4000:]
    return out


def clear_check(s: Mlxtg, ask: Any, attempts: int = 3) -> dict[str, Any]:
    """`POST /admin/cache/clear` right after a request (up to `attempts` times, each after a
    new request): status, and is the server still alive?"""
    import httpx

    res: dict[str, Any] = {"attempts": 0}
    for n in range(attempts):
        res["attempts"] = n + 1
        ask(s, f"Clear check {n}: which tool reads files?", "pre-clear")
        try:
            r = httpx.post(s.base + "/admin/cache/clear", json={}, timeout=60)
            res["status"], res["body"] = r.status_code, r.text[:300]
        except Exception as exc:  # noqa: BLE001
            res["status"], res["body"] = None, f"{type(exc).__name__}: {exc}"
        time.sleep(2)
        try:
            res["ready_after"] = httpx.get(s.base + "/ready", timeout=5).status_code
        except Exception as exc:  # noqa: BLE001
            res["ready_after"] = f"{type(exc).__name__}: {exc}"
        res["exit_code"] = s.proc.poll() if s.proc else None
        res["ok"] = res["status"] == 200 and res["ready_after"] == 200 and res["exit_code"] is None
        if not res["ok"]:
            res["log_tail"] = s.tail(80)
            log(
                f"  cache clear check FAILED (attempt {n + 1}): {res['status']} "
                f"{res['body'][:80]}; ready {res['ready_after']}; exit {res['exit_code']}"
            )
            return res
    log(f"  cache clear check ok ({attempts} attempts)")
    return res


def warmup(client: Any, srv: Server) -> float | None:
    """One short unrelated request, so one-time kernel setup is not charged to turn 1 (its
    prompt is far below every cache's minimum and shares no prefix with the agents')."""
    body = {
        "model": srv.model_field,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0.0,
        "stream": True,
    }
    rep = stream_chat(client, srv.base + "/v1/chat/completions", body, REQ_TIMEOUT)
    return rep.ttft if rep.ok else None
