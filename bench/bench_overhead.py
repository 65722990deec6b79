"""Fixed per-request overhead of mlxtg, stage by stage (issue 9, item 5).

    .venv/bin/python bench/bench_overhead.py [--reps 100] [--fast-http DIR]

Demo model, caches off, max_tokens=1, one fixed prompt. Interleaved request by request: the real
`mlxtg up`; the real gateway (+ the real Supervisor class) in front of fake backends that answer
ACCEPTED + OUTPUT at once; the gateway app in-process (httpx.ASGITransport), as shipped and with
deps.py's dependencies made async (patched in that process only; --fast-http DIR also puts
uvloop + httptools from DIR under that gateway). Then raw ZeroMQ round trips direct vs through
Supervisor.step(), and, in a worker-like process, validation, Preprocessor and prefill + argmax.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import zmq
from fastapi import Request

from mlxtg.models import DEMO_MODEL_NAME
from mlxtg.protocol import Accepted, Delta, Generate, Heartbeat, Output, decode, encode

PY = sys.executable
PROMPT = "Write one short sentence about the sea."
BODY = {"model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1, "temperature": 0}
FAKE_WORKER_ID = "fake-worker"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_generate() -> Generate:
    """The GENERATE the gateway builds for BODY (openai_routes.chat_completions)."""
    from mlxtg.gateway.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(BODY)
    return Generate(request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}", model=body.model,
                    params=body.params(), messages=[m.for_template() for m in body.messages],
                    tool_choice=body.effective_tool_choice(), stream=True, n=1)


def replies(rid: str) -> list[list[bytes]]:
    """What a worker sends for a max_tokens=1 request: ACCEPTED, then one OUTPUT."""
    delta = Delta(request_id=rid, text=" The", token_ids=[312], finish_reason="length",
                  completion_tokens=1)
    return [encode(Accepted(request_id=rid, prompt_tokens=24)), encode(Output(deltas=[delta]))]


# --- child roles ---------------------------------------------------------------------------------
def patch_deps() -> None:
    """Experiment, this process only: mlxtg/gateway/deps.py's dependencies as `async def`
    (FastAPI runs each plain `def` dependency in the threadpool). Before routes import."""
    import inspect

    from mlxtg.gateway import app as appmod
    from mlxtg.gateway import deps

    if inspect.iscoroutinefunction(deps.require_key):
        return  # mlxtg's own dependencies are async already

    def as_async(f: Any) -> Any:
        async def a(request: Request) -> Any:
            return f(request)

        return a

    for alias in (deps.Settings, deps.Client, deps.Metrics):
        d = alias.__metadata__[0]
        object.__setattr__(d, "dependency", as_async(d.dependency))
    appmod.require_key = as_async(deps.require_key)  # type: ignore[assignment]


def role_fake(mode: str, endpoint: str) -> None:
    """router: a fake supervisor (bind ROUTER); dealer: a fake worker (connect DEALER)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER if mode == "router" else zmq.DEALER)
    if mode == "router":
        sock.bind(endpoint)
    else:
        sock.setsockopt_string(zmq.IDENTITY, FAKE_WORKER_ID)
        sock.connect(endpoint)
        sock.send_multipart(encode(Heartbeat(worker_id=FAKE_WORKER_ID)))  # ROUTER learns our id
    print("ready", flush=True)
    while True:
        frames = sock.recv_multipart()
        head, frames = (frames[:1], frames[1:]) if mode == "router" else ([], frames)
        msg = decode(frames)
        if isinstance(msg, Generate):
            for out in replies(msg.request_id):
                sock.send_multipart(head + out)


def role_sup() -> None:
    """The real Supervisor with one READY fake worker handle (the fake dealer process)."""
    from mlxtg.models import demo_spec
    from mlxtg.supervisor.config import ServerSettings
    from mlxtg.supervisor.core import Supervisor
    from mlxtg.supervisor.processes import WorkerHandle, WorkerState

    class FakeProc:
        pid = os.getpid()

        def poll(self) -> None:
            return None

    # The fake worker sends no heartbeats: keep the watchdog from killing it.
    sup = Supervisor(ServerSettings(models=[demo_spec()], standby_worker=False, heartbeat_timeout=1e9))
    sup.pool.workers[FAKE_WORKER_ID] = WorkerHandle(worker_id=FAKE_WORKER_ID, spec=demo_spec(),
                                               proc=FakeProc(), state=WorkerState.READY)  # type: ignore[arg-type]
    print(json.dumps([sup.gateway_endpoint, sup.worker_endpoint]), flush=True)
    while True:
        sup.step()


def role_inproc(reps: int) -> None:
    """Worker-side costs in one process, loaded the way the worker loads (worker/loader.py)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlxtg.models import demo_spec
    from mlxtg.worker.loader import load
    from mlxtg.worker.preprocess import Preprocessor

    loaded = load(demo_spec())
    pre = Preprocessor(loaded)
    gen = make_generate()
    ids = pre(gen).prompt
    out: dict[str, list[float]] = {"validate": [], "codec": [], "preprocess": [], "prefill": []}
    for i in range(reps + 5):
        t0 = time.perf_counter()
        make_generate()
        t1 = time.perf_counter()
        decode(encode(gen))
        for fr in replies(gen.request_id):
            decode(fr)
        t2 = time.perf_counter()
        pre(gen)
        t3 = time.perf_counter()
        cache = make_prompt_cache(loaded.model)
        logits = loaded.model(mx.array(ids)[None], cache=cache)
        mx.argmax(logits[0, -1], axis=-1).item()
        t4 = time.perf_counter()
        if i >= 5:
            for k, a, b in (("validate", t0, t1), ("codec", t1, t2), ("preprocess", t2, t3),
                            ("prefill", t3, t4)):
                out[k].append((b - a) * 1e3)
    print(json.dumps({"samples": out, "prompt_tokens": len(ids)}), flush=True)


# --- the parent ----------------------------------------------------------------------------------
class Procs:
    def __init__(self, home: Path):
        self.procs: list[subprocess.Popen[str]] = []
        self.env = dict(os.environ, MLXTG_HOME=str(home))

    def start(self, args: list[str], env: dict[str, str] | None = None, wait_line: bool = True) -> str:
        p = subprocess.Popen([PY, *args], env=env or self.env, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p.stdout.readline().strip() if wait_line and p.stdout else ""

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            p.kill()


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            r = httpx.post(url + "/v1/chat/completions", json=BODY, timeout=5)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer a chat request within {timeout:.0f}s")


def is_token(line: str) -> bool:
    return line.startswith("data:") and '"content":"' in line and '"content":""' not in line


def stream_ttft(client: httpx.Client, url: str) -> float:
    t0, ttft = time.perf_counter(), None
    with client.stream("POST", url + "/v1/chat/completions", json={**BODY, "stream": True}) as r:
        for line in r.iter_lines():
            if ttft is None and is_token(line):
                ttft = (time.perf_counter() - t0) * 1e3
    assert ttft is not None, "no content chunk"
    return ttft


def total(client: httpx.Client, url: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=BODY).raise_for_status()
    return (time.perf_counter() - t0) * 1e3, r.headers.get("x-mlxtg-cache", "")


def hop(reps: int, direct_ep: str, sup_front: str) -> dict[str, list[float]]:
    """GENERATE -> (ACCEPTED, OUTPUT) round trips, sync sockets, direct vs via the supervisor."""
    ctx = zmq.Context()
    direct = ctx.socket(zmq.ROUTER)  # what the supervisor's back socket is to a worker
    direct.bind(direct_ep)
    via = ctx.socket(zmq.DEALER)  # what the gateway's socket is to the supervisor
    via.connect(sup_front)
    ident = direct.recv_multipart()[0]  # the fake worker's first heartbeat
    gen = make_generate()
    out: dict[str, list[float]] = {"direct": [], "via": []}
    for i in range(reps + 20):
        for kind in ("direct", "via") if i % 2 else ("via", "direct"):
            gen.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            sock, head = (direct, [ident]) if kind == "direct" else (via, [])
            t0 = time.perf_counter()
            sock.send_multipart([*head, *encode(gen)])
            while not isinstance(decode(sock.recv_multipart()[len(head):]), Output):
                pass
            if i >= 20:
                out[kind].append((time.perf_counter() - t0) * 1e3)
    ctx.destroy()
    return out


async def asgi_ttft(reps: int, endpoint: str) -> list[float]:
    """The gateway app in this process: httpx.ASGITransport, no uvicorn, no TCP."""
    from mlxtg.gateway.app import create_app
    from mlxtg.gateway.settings import GatewaySettings

    app = create_app(GatewaySettings(supervisor_endpoint=endpoint))
    res = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            for i in range(reps + 10):
                t0, first = time.perf_counter(), None
                async with c.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if first is None and is_token(line):
                            first = time.perf_counter()
                if i >= 10 and first is not None:
                    res.append((first - t0) * 1e3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--role", choices=["fake", "sup", "inproc", "asgi", "gateway"])
    ap.add_argument("--patch-deps", action="store_true")
    ap.add_argument("--fast-http", default="", help="a folder holding uvloop + httptools "
                    "(pip install --target DIR uvloop httptools): adds a fixed-gateway variant")
    ap.add_argument("--mode", default="router")
    ap.add_argument("--endpoint", default="")
    args = ap.parse_args()
    if args.role == "fake":
        return role_fake(args.mode, args.endpoint)
    if args.role == "sup":
        return role_sup()
    if args.role == "inproc":
        return role_inproc(args.reps)
    if args.patch_deps:
        patch_deps()
    if args.role == "asgi":
        return print(json.dumps(asyncio.run(asgi_ttft(args.reps, args.endpoint))), flush=True)
    if args.role == "gateway":
        from mlxtg.gateway.__main__ import main as gateway_main

        return gateway_main()  # type: ignore[return-value]

    home = Path(tempfile.mkdtemp(prefix="ovh-"))
    procs = Procs(home)
    me = str(Path(__file__).resolve())
    started = time.time()
    try:
        from mlxtg.supervisor.processes import find_fast_blas

        blas = find_fast_blas()
        wenv = dict(procs.env, LD_PRELOAD=blas) if blas else procs.env
        inproc = json.loads(procs.start([me, "--role", "inproc", "--reps", str(args.reps)], wenv))
        fake_ep = f"ipc://{home}/fake-sup.sock"
        procs.start([me, "--role", "fake", "--mode", "router", "--endpoint", fake_ep])
        sup_front, sup_back = json.loads(procs.start([me, "--role", "sup"]))
        procs.start([me, "--role", "fake", "--mode", "dealer", "--endpoint", sup_back])
        direct_ep = f"ipc://{home}/direct.sock"
        procs.start([me, "--role", "fake", "--mode", "dealer", "--endpoint", direct_ep], wait_line=False)
        hops = hop(args.reps, direct_ep, sup_front)
        asgi = {v: json.loads(procs.start([me, "--role", "asgi", "--reps", str(args.reps),
                                           "--endpoint", fake_ep, *f]))
                for v, f in (("shipped", []), ("async deps", ["--patch-deps"]))}

        urls = {}
        kinds = [("gw", fake_ep, []), ("gw+sup", sup_front, [])]
        kinds.append(("gw fixed", fake_ep, ["--patch-deps"]))
        for kind, ep, extra in kinds:
            port = free_port()
            cfg = {"supervisor_endpoint": ep, "host": "127.0.0.1", "port": port}
            env = dict(procs.env, MLXTG_GATEWAY_CONFIG=json.dumps(cfg))
            if extra and args.fast_http:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (args.fast_http, env.get("PYTHONPATH")) if p)
            procs.start([me, "--role", "gateway", *extra], env, wait_line=False)
            urls[kind] = f"http://127.0.0.1:{port}"
        port = free_port()
        up_home = home / "up"
        procs.start(["-m", "mlxtg", "up", "--port", str(port), "--cache-ram-gb", "0",
                     "--cache-disk-gb", "0"], dict(procs.env, MLXTG_HOME=str(up_home)), wait_line=False)
        urls["real"] = f"http://127.0.0.1:{port}"
        for u in urls.values():
            wait_http(u, 180)
        e2e: dict[str, list[float]] = {f"{k} {m}": [] for k in urls for m in ("stream", "total")}
        cache_hdr = set()
        with httpx.Client(timeout=30) as client:
            for i in range(args.reps + 10):
                order = list(urls.items())
                order = order[i % len(order):] + order[:i % len(order)]
                for kind, u in order:
                    ttft = stream_ttft(client, u)
                    tot, hdr = total(client, u)
                    if kind == "real":
                        cache_hdr.add(hdr)
                    if i >= 10:
                        e2e[f"{kind} stream"].append(ttft)
                        e2e[f"{kind} total"].append(tot)
    finally:
        procs.stop()
        shutil.rmtree(home, ignore_errors=True)
    report(args, inproc, hops, asgi, e2e, cache_hdr, time.time() - started)


def report(args: Any, inproc: dict[str, Any], hops: dict[str, list[float]],
           asgi: dict[str, list[float]], e2e: dict[str, list[float]], cache_hdr: set[str],
           seconds: float) -> None:
    s = inproc["samples"]
    fixed = "async deps" + (" + uvloop/httptools" if args.fast_http else "")
    rows = [
        ("E2E stream TTFT, real `mlxtg up`", e2e["real stream"], "httpx, send -> first content chunk"),
        ("E2E non-stream total, real", e2e["real total"], "httpx, send -> whole body"),
        ("TTFT: real gateway + real Supervisor, fake worker", e2e["gw+sup stream"],
         "3 processes; worker answers ACCEPTED+OUTPUT at once"),
        ("TTFT: real gateway, fake supervisor", e2e["gw stream"], "uvicorn process, ROUTER answers at once"),
        (f"TTFT: gateway ({fixed}), fake supervisor", e2e["gw fixed stream"],
         "same, deps.py patched in that process"),
        ("TTFT: gateway app in-process (ASGI)", asgi["shipped"], "httpx.ASGITransport, fake ROUTER"),
        ("TTFT: gateway app in-process, async deps", asgi["async deps"], "same, deps.py patched"),
        ("hop RTT direct", hops["direct"], "GENERATE -> ACCEPTED+OUTPUT, ROUTER <-> DEALER, ipc"),
        ("hop RTT via Supervisor.step()", hops["via"], "DEALER -> ROUTER, ROUTER -> DEALER, ipc"),
        ("request validation + GENERATE build", s["validate"], "pydantic ChatCompletionRequest + params"),
        ("msgpack encode+decode, 3 messages", s["codec"], "mlxtg.protocol"),
        ("chat template + tokenise", s["preprocess"], "worker Preprocessor(Generate)"),
        (f"prefill {inproc['prompt_tokens']} tokens + argmax", s["prefill"],
         "loader.load, fresh KV cache, .item()"),
    ]
    print(f"### Fixed per-request overhead ({args.reps} reps, demo model, caches off)\n")
    print(f"`.venv/bin/python bench/bench_overhead.py --reps {args.reps}"
          f"{' --fast-http ' + args.fast_http if args.fast_http else ''}` ({seconds:.0f} s, "
          f"load {os.getloadavg()[0]:.2f}; real server's x-mlxtg-cache: {', '.join(sorted(cache_hdr))})\n")
    print("| stage | p50 ms | p90 ms | how measured |\n|---|---:|---:|---|")
    for name, xs, how in rows:
        print(f"| {name} | {pct(xs, 0.5):.2f} | {pct(xs, 0.9):.2f} | {how} |")
    m = {k: statistics.median(v) for k, v in {**s, **e2e}.items()}
    hd, hv = statistics.median(hops["direct"]), statistics.median(hops["via"])
    worker = m["preprocess"] + m["prefill"]
    print("\n| derived, from p50s | ms |\n|---|---:|")
    for name, v in (
        ("supervisor hop per message ((via - direct) RTT / 2 messages on the path)", (hv - hd) / 2),
        ("supervisor hop in situ (gw+sup TTFT - gw TTFT)", m["gw+sup stream"] - m["gw stream"]),
        ("gateway: HTTP + uvicorn + app (gw TTFT - direct hop RTT)", m["gw stream"] - hd),
        ("  of which the 4 threadpool dependencies (ASGI shipped - async deps)",
         statistics.median(asgi["shipped"]) - statistics.median(asgi["async deps"])),
        ("  of which uvicorn + TCP + client (gw TTFT - ASGI TTFT)",
         m["gw stream"] - statistics.median(asgi["shipped"])),
        (f"gateway saving with {fixed} (gw - gw fixed)", m["gw stream"] - m["gw fixed stream"]),
        ("worker compute in-process (template + tokenise + prefill)", worker),
        ("sum of parts (gw+sup TTFT + worker compute)", m["gw+sup stream"] + worker),
        ("E2E stream TTFT - in-process prefill", m["real stream"] - m["prefill"]),
        ("unexplained: E2E - sum of parts (inside the worker process)",
         m["real stream"] - m["gw+sup stream"] - worker),
    ):
        print(f"| {name} | {v:.2f} |")


if __name__ == "__main__":
    main()
