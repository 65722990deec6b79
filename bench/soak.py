"""Soak test (issue 14): N clients x M minutes of mixed traffic against a real `mlxtg up`.

    python -m bench.soak [--clients 32] [--minutes 5] [--seed 0] [--model PATH] [--write]

Starts `mlxtg up` (the demo model unless --model) under a temporary MLXTG_HOME and records the
solo outputs of fixed greedy prompts, one at a time. Then N async clients loop until the
deadline, each picking a random kind of request: chat and completions (streamed or not, prompt
lists, n > 1, logprobs, stop strings), guided JSON and choice, enforced tool calls, Anthropic
Messages, Responses, the greedy prompts again (each output must equal its solo one), deliberate
disconnects (a stream dropped after a few events, a tiny client timeout) and bad requests (the
expected 4xx, counted apart from errors). Every answer is checked: status, the stream's last
event, the output against its constraint. Every `--sample-s` the worker's RSS and MLX memory are
sampled; at the end the server must go idle and answer /metrics, and `mlxtg up` must exit 0.
Prints a markdown summary; --write puts it into bench/RESULTS.md as the "## Soak" section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psutil

if __package__ in (None, ""):  # `python bench/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.agent_report import now_str  # noqa: E402
from bench.common import (  # noqa: E402
    ROOT,
    export_head,
    find_openblas,
    git_commit,
    log,
    machine_info,
    replace_section,
)
from bench.servers import Mlxtg  # noqa: E402
from bench.streams import DONE, pct, sse_json  # noqa: E402

HEADING = "## Soak (issue 14: reliability)"
MiB = 2**20
TIMEOUT = 180.0  # one request, queueing included, on a loaded 2-core machine

TOPICS = ["the sea", "a red bicycle", "Paris", "bread", "the moon", "a small dog", "winter", "numbers"]
LONG = " ".join(f"Note {i}: the {t} is near the {u}." for i, (t, u) in
                enumerate(zip(TOPICS * 8, reversed(TOPICS * 8), strict=True)))
# (endpoint, prompt): greedy, run alone first; the long one is chunked while streams run.
GREEDY = [("chat", "Hello! How are you?"), ("chat", "What is the capital of France?"),
          ("chat", "Write one sentence about the sea."), ("chat", "What is 7 + 5?"),
          ("chat", f"{LONG}\nSummarise the notes."), ("text", "Once upon a time"),
          ("text", "The capital of Germany is"), ("text", "def add(a, b):")]
SCHEMA: dict[str, Any] = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
                          "properties": {"name": {"type": "string", "maxLength": 16},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                  "maxItems": 3}}}
TOOL_SCHEMAS: dict[str, Any] = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                    "required": ["city"]},
    "add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"]}}
TOOLS = [{"type": "function", "function": {"name": k, "parameters": v}} for k, v in TOOL_SCHEMAS.items()]
OK = ("ok", "disconnect", "refused")  # the outcomes that are not errors


class Bad(Exception):
    """A checked answer that is wrong: `kind` is the error type of the report."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(slots=True)
class Tally:
    by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    validated: int = 0  # guided JSON, choices and tool calls checked against their constraint
    greedy_same: int = 0
    greedy_total: int = 0

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.by_kind.values())


class Soak:
    def __init__(self, base: str, model: str, client: httpx.AsyncClient):
        self.base, self.model, self.http = base, model, client
        self.solo: list[str] = []
        self.tally = Tally()

    # -- transport ---------------------------------------------------------------------------
    async def post(self, path: str, body: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
        r = await self.http.post(self.base + path, json={"model": self.model, **body}, timeout=timeout)
        if r.status_code != 200:
            raise Bad(f"HTTP {r.status_code}", r.text[:300])
        return dict(r.json())

    async def stream(self, path: str, body: dict[str, Any], stop_after: int | None = None) -> list[Any]:
        """The data events of a streamed request; with `stop_after`, close it after that many."""
        events: list[Any] = []
        body = {"model": self.model, **body, "stream": True}
        async with self.http.stream("POST", self.base + path, json=body, timeout=TIMEOUT) as r:
            if r.status_code != 200:
                raise Bad(f"HTTP {r.status_code}", (await r.aread()).decode(errors="replace")[:300])
            async for line in r.aiter_lines():
                if (obj := sse_json(line)) is not None:
                    events.append(obj)
                    if isinstance(obj, dict) and (obj.get("error")
                                                  or obj.get("type") in ("error", "response.failed")):
                        raise Bad("error event", json.dumps(obj)[:300])
                    if stop_after is not None and len(events) >= stop_after:
                        break
        return events

    async def openai(self, path: str, body: dict[str, Any], stream: bool
                     ) -> tuple[list[dict[str, Any]], Any]:
        """Choices (index order) of a chat or completions request, streamed or not, as
        {"text", "calls", "finish", "tokens"}; and the usage. A stream must end with [DONE]."""
        if not stream:
            r = await self.post(path, body)
            out = []
            for ch in sorted(r["choices"], key=lambda c: c["index"]):
                msg = ch.get("message") or {}
                lp = ch.get("logprobs") or {}
                out.append({"text": ch.get("text", msg.get("content")) or "",
                            "finish": ch["finish_reason"], "tokens": lp.get("content"),
                            "calls": [c["function"] for c in msg.get("tool_calls") or []]})
            return out, r.get("usage")
        events = await self.stream(path, {**body, "stream_options": {"include_usage": True}})
        if not events or events[-1] is not DONE:
            raise Bad("bad stream end", f"last event {str(events[-1:])[:200]}")
        acc: dict[int, dict[str, Any]] = {}
        usage = None
        for ev in events[:-1]:
            usage = ev.get("usage") or usage
            for ch in ev.get("choices") or []:
                a = acc.setdefault(ch["index"], {"text": "", "finish": None, "calls": {},
                                                 "tokens": None})
                d = ch.get("delta") or {}
                a["text"] += ch.get("text") or d.get("content") or ""
                a["finish"] = ch.get("finish_reason") or a["finish"]
                for tc in d.get("tool_calls") or []:
                    c = a["calls"].setdefault(tc["index"], {"name": "", "arguments": ""})
                    for k in ("name", "arguments"):
                        c[k] += (tc.get("function") or {}).get(k) or ""
                if lp := ch.get("logprobs"):
                    a["tokens"] = (a["tokens"] or []) + (lp.get("content") or [])
        out = [acc[i] for i in sorted(acc)]
        for a in out:
            a["calls"] = [a["calls"][k] for k in sorted(a["calls"])]
        return out, usage

    # -- request kinds: each returns None (ok), "disconnect" or "refused", or raises Bad ------
    def prompt(self, rng: random.Random) -> str:
        ask = rng.choice(["Tell me about", "Write a line on", "Say something about", "Hi! What is"])
        return f"{ask} {rng.choice(TOPICS)}?"

    def sampling(self, rng: random.Random) -> dict[str, Any]:
        return {"max_tokens": rng.randint(4, 40), "temperature": rng.choice([0.0, 0.7, 1.0]),
                **({"seed": rng.randint(0, 999)} if rng.random() < 0.5 else {})}

    async def chat(self, rng: random.Random, stream: bool, **extra: Any) -> list[dict[str, Any]]:
        body = {"messages": [{"role": "user", "content": self.prompt(rng)}], **self.sampling(rng),
                **extra}
        choices, usage = await self.openai("/v1/chat/completions", body, stream)
        if len(choices) != body.get("n", 1) or any(
                c["finish"] not in ("stop", "length", "tool_calls") for c in choices):
            raise Bad("invalid output", f"choices {choices}"[:300])
        if stream and not (usage or {}).get("completion_tokens", 0) >= len(choices):
            raise Bad("invalid output", f"usage {usage}")
        return choices

    async def k_completion(self, rng: random.Random) -> None:
        prompts = [self.prompt(rng) for _ in range(rng.randint(1, 3))]
        n = rng.randint(1, 2)
        prompt = prompts if len(prompts) > 1 or rng.random() < 0.5 else prompts[0]
        choices, _ = await self.openai("/v1/completions", {"prompt": prompt, "n": n, **self.sampling(rng)},
                                       rng.random() < 0.5)
        if len(choices) != len(prompts) * n:
            raise Bad("invalid output", f"{len(choices)} choices, {len(prompts)} prompts x n={n}")

    async def k_stop(self, rng: random.Random) -> None:
        stops = rng.sample([" the", ".", "!", " is", "\n"], 2)
        body = {"prompt": self.prompt(rng), "stop": stops, **self.sampling(rng)}
        choices, _ = await self.openai("/v1/completions", body, rng.random() < 0.5)
        if any(s in choices[0]["text"] for s in stops):
            raise Bad("invalid output", f"stop {stops} in {choices[0]['text']!r}")

    async def k_logprobs(self, rng: random.Random) -> None:
        k, stream = rng.randint(0, 5), rng.random() < 0.5
        for c in await self.chat(rng, stream, logprobs=True, top_logprobs=k):
            toks = c["tokens"] or []
            joined = "".join(t["token"] for t in toks)
            if joined != c["text"] or any(len(t["top_logprobs"]) != k for t in toks):
                raise Bad("invalid output (logprobs)",
                          f"stream {stream}, top {k}: tokens {joined!r}, text {c['text']!r}")

    async def k_guided_json(self, rng: random.Random) -> None:
        how: dict[str, Any] = rng.choice([{"guided_json": SCHEMA}, {"response_format": {
            "type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}])
        for c in await self.chat(rng, rng.random() < 0.5, **how, max_tokens=80):
            if c["finish"] == "stop":
                try:
                    jsonschema.validate(json.loads(c["text"]), SCHEMA)
                except (ValueError, jsonschema.ValidationError) as exc:
                    raise Bad("invalid output", f"{c['text']!r}: {exc}"[:300]) from exc
                self.tally.validated += 1

    async def k_guided_choice(self, rng: random.Random) -> None:
        options = rng.sample(["red", "green", "blue", "yes", "no", "maybe"], 3)
        for c in await self.chat(rng, rng.random() < 0.5, guided_choice=options, max_tokens=10):
            if c["finish"] == "stop" and c["text"] not in options:
                raise Bad("invalid output", f"{c['text']!r} not in {options}")
            self.tally.validated += c["finish"] == "stop"

    async def k_tools(self, rng: random.Random) -> None:
        for c in await self.chat(rng, rng.random() < 0.5, tools=TOOLS, tool_choice="required",
                                 max_tokens=60):
            if c["finish"] == "length":
                continue
            if c["finish"] != "tool_calls" or not c["calls"]:
                raise Bad("invalid output", f"tool_choice required gave {c}"[:300])
            for call in c["calls"]:
                try:
                    jsonschema.validate(json.loads(call["arguments"]), TOOL_SCHEMAS[call["name"]])
                except (ValueError, KeyError, jsonschema.ValidationError) as exc:
                    raise Bad("invalid output", f"call {call}: {exc}"[:300]) from exc
                self.tally.validated += 1

    async def k_messages(self, rng: random.Random) -> None:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": self.prompt(rng)}],
                                "max_tokens": rng.randint(4, 40),
                                "temperature": rng.choice([0.0, 1.0])}
        if rng.random() < 0.3:
            body["stop_sequences"] = ["."]
        if rng.random() < 0.5:
            r = await self.post("/v1/messages", body)
            if r.get("type") != "message" or r.get("stop_reason") not in (
                    "end_turn", "max_tokens", "stop_sequence"):
                raise Bad("invalid output", json.dumps(r)[:300])
            return
        events = await self.stream("/v1/messages", body)
        if not events or not isinstance(events[-1], dict) or events[-1].get("type") != "message_stop":
            raise Bad("bad stream end", f"last event {str(events[-1:])[:200]}")

    async def k_responses(self, rng: random.Random) -> None:
        body = {"input": self.prompt(rng), "max_output_tokens": rng.randint(4, 40),
                "store": rng.random() < 0.3}
        if rng.random() < 0.5:
            r = await self.post("/v1/responses", body)
            if r.get("status") not in ("completed", "incomplete"):
                raise Bad("invalid output", json.dumps(r)[:300])
            return
        events = await self.stream("/v1/responses", body)
        last = events[-1] if events and isinstance(events[-1], dict) else {}
        if last.get("type") not in ("response.completed", "response.incomplete"):
            raise Bad("bad stream end", f"last event {str(events[-1:])[:200]}")
        deltas = "".join(e.get("delta", "") for e in events
                         if e.get("type") == "response.output_text.delta")
        final = "".join(p.get("text", "") for item in last["response"]["output"]
                        for p in item.get("content", []))
        if deltas != final:
            raise Bad("invalid output", f"deltas {deltas!r} != final {final!r}")

    async def greedy(self, i: int, stream: bool) -> str:
        endpoint, prompt = GREEDY[i]
        body: dict[str, Any] = {"max_tokens": 24, "temperature": 0.0}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        choices, _ = await self.openai(path, body, stream)
        return str(choices[0]["text"])

    async def k_greedy(self, rng: random.Random) -> None:
        i = rng.randrange(len(GREEDY))
        text = await self.greedy(i, rng.random() < 0.5)
        self.tally.greedy_total += 1
        if text != self.solo[i]:
            raise Bad("mismatch vs solo", f"prompt {i}: {text!r} != {self.solo[i]!r}")
        self.tally.greedy_same += 1

    async def k_drop_stream(self, rng: random.Random) -> str:
        msgs = [{"role": "user", "content": self.prompt(rng)}]
        cases: list[tuple[str, dict[str, Any]]] = [
            ("/v1/chat/completions", {"messages": msgs, "max_tokens": 64, "ignore_eos": True}),
            ("/v1/messages", {"messages": msgs, "max_tokens": 64}),
            ("/v1/responses", {"input": self.prompt(rng), "max_output_tokens": 64})]
        await self.stream(*rng.choice(cases), stop_after=rng.randint(1, 4))
        return "disconnect"

    async def k_drop_timeout(self, rng: random.Random) -> str | None:
        body = {"messages": [{"role": "user", "content": self.prompt(rng)}], "max_tokens": 64,
                "ignore_eos": True}
        try:
            await self.post("/v1/chat/completions", body, timeout=rng.uniform(0.05, 0.5))
        except httpx.TimeoutException:
            return "disconnect"
        return None

    async def k_bad(self, rng: random.Random) -> str:
        user = [{"role": "user", "content": "Hi"}]
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("/v1/chat/completions", {"model": "no-such-model", "messages": user}, 404),
            ("/v1/chat/completions", {"messages": user, "max_tokens": -5}, 400),
            ("/v1/chat/completions", {"messages": []}, 400),
            ("/v1/chat/completions", {"messages": user, "guided_json": {"type": "nonsense"}},
             400),
            ("/v1/chat/completions", {"messages": user, "guided_choice": []}, 400),
            ("/v1/chat/completions", {"messages": user, "max_tokens": 10**6}, 400),
            ("/v1/chat/completions", {"messages": user, "logprobs": True, "top_logprobs": 50}, 400),
            ("/v1/completions", {"prompt": LONG * 3, "max_tokens": 4}, 400),
            ("/v1/messages", {"messages": user}, 400),
            ("/v1/responses", {"input": [{"type": "input_image"}]}, 400)]
        path, body, want = rng.choice(cases)
        r = await self.http.post(self.base + path, json={"model": self.model, **body}, timeout=TIMEOUT)
        if r.status_code != want or "error" not in r.json():
            raise Bad(f"HTTP {r.status_code}",
                      f"expected {want} for {path} {json.dumps(body)[:120]}: {r.text[:200]}")
        return "refused"

    # -- the run -------------------------------------------------------------------------------
    async def client(self, i: int, seed: int, deadline: float, cap: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline and self.tally.total() < cap:
            kind = rng.choices(list(KINDS), [w for w, _ in KINDS.values()])[0]
            t0, detail = time.monotonic(), ""
            try:
                result = await KINDS[kind][1](self, rng)
                outcome = result if isinstance(result, str) else "ok"
            except Bad as exc:
                outcome, detail = exc.kind, exc.detail
            except httpx.TimeoutException as exc:
                outcome, detail = "client timeout", f"{type(exc).__name__} after {TIMEOUT:.0f}s"
            except httpx.TransportError as exc:
                outcome, detail = f"transport {type(exc).__name__}", str(exc) or "connection reset or closed"
            except Exception as exc:  # noqa: BLE001 - e.g. a body that is not JSON: counted
                outcome, detail = f"client {type(exc).__name__}", str(exc)
            self.tally.by_kind[kind][outcome] += 1
            self.tally.seconds[kind].append(time.monotonic() - t0)
            if outcome not in OK:
                self.tally.errors[outcome] += 1
                if len(self.tally.examples[outcome]) < 3:
                    self.tally.examples[outcome].append(f"{kind}: {detail}")
                    log(f"  error ({outcome}) in {kind}: {detail[:200]}")


Kind = Callable[[Soak, random.Random], Awaitable[Any]]
# Request kinds and how often each client picks them.
KINDS: dict[str, tuple[int, Kind]] = {
    "chat": (8, lambda s, r: s.chat(r, False)), "chat_stream": (8, lambda s, r: s.chat(r, True)),
    "chat_n": (4, lambda s, r: s.chat(r, r.random() < 0.5, n=r.randint(2, 4))),
    "completion": (8, Soak.k_completion), "stop": (4, Soak.k_stop), "logprobs": (4, Soak.k_logprobs),
    "guided_json": (6, Soak.k_guided_json), "guided_choice": (4, Soak.k_guided_choice),
    "tools": (6, Soak.k_tools), "messages": (8, Soak.k_messages), "responses": (6, Soak.k_responses),
    "greedy": (14, Soak.k_greedy), "drop_stream": (6, Soak.k_drop_stream),
    "drop_timeout": (4, Soak.k_drop_timeout), "bad": (4, Soak.k_bad)}


async def sample_memory(soak: Soak, t_start: float, every: float, until: float,
                        rows: list[dict[str, Any]]) -> None:
    """Every `every` s until `until`: the worker's RSS (psutil) and its heartbeat's MLX memory."""
    while True:
        try:
            status = (await soak.http.get(soak.base + "/admin/status", timeout=30)).json()
            w = next(m["worker"] for m in status["models"] if m.get("worker"))
            st = w.get("stats") or {}
            rows.append({"t": time.monotonic() - t_start, "requests": soak.tally.total(), "pid": w["pid"],
                         "rss": psutil.Process(w["pid"]).memory_info().rss,
                         "mlx_active": st.get("mlx_active_bytes", 0),
                         "mlx_peak": st.get("mlx_peak_bytes", 0), "kv": st.get("kv_bytes", 0),
                         "cache": (st.get("prefix_cache") or {}).get("bytes", 0),
                         "running": st.get("running"), "queued": st.get("queued")})
        except Exception as exc:  # noqa: BLE001 - a sample is best effort; say why it is missing
            log(f"  memory sample failed: {type(exc).__name__}: {exc}")
        if time.monotonic() >= until:
            return
        await asyncio.sleep(min(every, max(until - time.monotonic(), 0.1)))


async def after(soak: Soak) -> dict[str, Any]:
    """Idle within a few seconds, /metrics answers, the supervisor's counters."""
    t0, first, idle_s, status = time.monotonic(), None, None, {}
    while time.monotonic() - t0 < 20 and idle_s is None:
        status = (await soak.http.get(soak.base + "/admin/status", timeout=30)).json()
        w = (status.get("models") or [{}])[0].get("worker") or {}
        st = w.get("stats") or {}
        if st.get("running") == 0 and st.get("queued") == 0 and not w.get("inflight"):
            # Idle in two heartbeats 1.5 s apart: one snapshot may predate the last abort.
            first = time.monotonic() - t0 if first is None else first
            idle_s = first if time.monotonic() - t0 - first >= 1.5 else None
        else:
            first = None
        await asyncio.sleep(0.5)
    m = await soak.http.get(soak.base + "/metrics", timeout=30)
    by_status = {line.split('"')[1]: int(float(line.split()[-1])) for line in m.text.splitlines()
                 if line.startswith("mlxtg_requests_total{")}
    return {"idle_s": idle_s, "metrics_status": m.status_code, "metrics_requests": by_status,
            "counters": status.get("counters", {})}


async def run(base: str, model: str, a: argparse.Namespace
              ) -> tuple[Soak, list[dict[str, Any]], dict[str, Any]]:
    conns = a.clients * 2 + 8
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=conns,
                                                     max_keepalive_connections=conns)) as http:
        soak = Soak(base, model, http)
        for i in range(len(GREEDY)):
            soak.solo.append(await soak.greedy(i, False))
            log(f"  solo {i}: {soak.solo[-1]!r}")
        log(f"solo outputs of {len(GREEDY)} greedy prompts recorded; {a.clients} clients, {a.minutes} min")
        t0 = time.monotonic()
        deadline = t0 + a.minutes * 60
        rows: list[dict[str, Any]] = []
        sampler = asyncio.create_task(sample_memory(soak, t0, a.sample_s, deadline, rows))
        cap = int(a.clients * a.minutes * 600)  # bounds the loop even if every request failed at once
        await asyncio.gather(*(soak.client(i, a.seed, deadline, cap) for i in range(a.clients)))
        await sampler
        end = await after(soak)
        end["wall_s"] = time.monotonic() - t0
        await sample_memory(soak, t0, 0.0, time.monotonic(), rows)  # once more, idle
        return soak, rows, end


def report(soak: Soak, rows: list[dict[str, Any]], end: dict[str, Any], facts: dict[str, Any]) -> str:
    t, info = soak.tally, machine_info()
    L = [HEADING, "",
         f"Command: `make soak ARGS={shlex.quote(shlex.join(sys.argv[1:]))}` (`python -m bench.soak "
         f"{facts['args']}`), {now_str()}, commit `{facts['commit']}`{facts.get('served', '')}. "
         f"Machine: {info['cores']} CPU cores ({info['cpu']}), {info['ram_gb']} GB RAM, mlx "
         f"{info['mlx']}, BLAS: {facts['blas']}; model "
         f"`{facts['model']}`. The machine is shared with other engineers' test runs, so latencies "
         "are noisy; counts and checks are not.", "",
         f"{t.total()} requests in {end['wall_s']:.0f} s from {facts['clients']} clients, each looping "
         "over random kinds; every answer checked (status, the stream's last event, constraints, "
         "usage). Disconnects: a stream closed after 1-4 events, or a non-streamed request with a "
         "0.05-0.5 s client timeout. Refused: bad requests answered with the expected 4xx. "
         f"{t.validated} guided JSON, choice and tool-call outputs validated.", "",
         "| kind | requests | ok | disconnects | refused | errors | p50 s | p95 s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        c, s = t.by_kind.get(kind, Counter()), t.seconds.get(kind, [])
        errs = sum(v for k, v in c.items() if k not in OK)
        L.append(f"| {kind} | {sum(c.values())} | {c['ok']} | {c['disconnect']} | {c['refused']} | "
                 f"{errs} | {pct(s, 0.5):.2f} | {pct(s, 0.95):.2f} |")
    L += ["", "Errors by type:" + (" **none**." if not t.errors else "")]
    L += [f"- {kind}: {n} (e.g. {'; '.join(t.examples[kind])[:400]})" for kind, n in t.errors.most_common()]
    L += ["", f"Greedy identity: **{t.greedy_same} / {t.greedy_total}** soak outputs equal to the "
          f"solo output of the same prompt ({len(GREEDY)} prompts, chat and completions, streamed or "
          "not, max_tokens 24; one prompt is ~1,100 tokens, over the 512-token prefill budget while "
          "streams run).", "",
          "Worker memory (RSS: psutil on the worker pid; MLX active and peak, KV and RAM prompt cache: "
          "the worker's heartbeat stats):", "",
          "| t s | requests | RSS MiB | MLX active MiB | MLX peak MiB | KV MiB | prompt cache MiB "
          "| running | queued |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    L += [f"| {r['t']:.0f} | {r['requests']} | {r['rss'] / MiB:.0f} | {r['mlx_active'] / MiB:.1f} | "
          f"{r['mlx_peak'] / MiB:.1f} | {r['kv'] / MiB:.1f} | {r['cache'] / MiB:.1f} | {r['running']} | "
          f"{r['queued']} |" for r in rows]
    if rows:
        rss, act = [r["rss"] / MiB for r in rows], [r["mlx_active"] / MiB for r in rows]
        pids = ", ".join(str(p) for p in sorted({r["pid"] for r in rows}))
        L += ["", f"RSS start / peak / end: {rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} MiB; MLX "
              f"active {act[0]:.1f} / {max(act):.1f} / {act[-1]:.1f} MiB; worker pids seen: {pids}."]
    c = end["counters"]
    idle = f"{end['idle_s']:.1f} s" if end["idle_s"] is not None else "**not within 20 s**"
    L += ["", f"After the run: idle (running and queued 0) after {idle}; `GET /metrics` "
          f"{end['metrics_status']}, `mlxtg_requests_total` by status "
          f"{json.dumps(end['metrics_requests'], sort_keys=True)}; worker restarts "
          f"{c.get('worker_restarts')}, hangs {c.get('worker_hangs')}; `mlxtg up` exit code after SIGINT "
          f"{facts['exit_code']}; tracebacks in the server log {facts['tracebacks']}."]
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None, help="a model folder (default: the demo model)")
    ap.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--write", action="store_true", help="put the summary into bench/RESULTS.md")
    ap.add_argument("--head", action="store_true",
                    help="serve HEAD's mlxtg/ (git archive), not the working tree's uncommitted edits")
    a = ap.parse_args()
    args = f"--clients {a.clients} --minutes {a.minutes:g} --seed {a.seed}"
    args += (f" --model {a.model}" if a.model else "") + (" --head" if a.head else "")
    facts: dict[str, Any] = {"clients": a.clients, "commit": git_commit(), "args": args}
    with tempfile.TemporaryDirectory(prefix="mlxtg-soak-") as tmp:
        if a.head:  # the server runs outside the checkout, so PYTHONPATH decides what it imports
            facts["commit"] = export_head(Path(tmp) / "src")
            facts["served"] = " (served from `git archive` of it)"
            os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(tmp) / "src"),
                                                        os.environ.get("PYTHONPATH", "")])
        srv = Mlxtg(a.model, find_openblas(), Path(tmp), log_name="server.log")
        log(f"starting mlxtg up (home {srv.home})")
        srv.start(timeout=300)
        proc = srv.proc
        try:
            facts |= {"blas": srv.blas_in_use(), "model": srv.model_field}
            soak, rows, end = asyncio.run(run(srv.base, srv.model_field, a))
        finally:
            srv.stop()
        text = srv.log_path.read_text(errors="replace")
    facts |= {"exit_code": proc.returncode if proc else None, "tracebacks": text.count("Traceback")}
    if facts["tracebacks"]:
        log("server log from its first traceback:\n" + text[max(text.index("Traceback") - 300, 0):][:3000])
    section = report(soak, rows, end, facts)
    print("\n" + section)
    if a.write:
        replace_section(ROOT / "bench" / "RESULTS.md", HEADING, section)
        log("wrote bench/RESULTS.md")
    clean = (not soak.tally.errors and end["idle_s"] is not None and end["metrics_status"] == 200
             and facts["exit_code"] == 0 and not facts["tracebacks"]
             and not end["counters"].get("worker_restarts"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
