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
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_agent.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import (  # noqa: E402
    DEMO_MODEL,
    OUT,
    ROOT,
    find_openblas,
    free_port,
    loadavg,
    machine_info,
)
from bench.common import env_with_preload as env_without_preload  # noqa: E402
from bench.servers import stop_tree  # noqa: E402

PY = sys.executable
RESULTS = ROOT / "bench" / "RESULTS-agent.md"
BIG_DIR = OUT / "agent-big"
BIG_CFG = {"hidden": 1024, "layers": 12, "intermediate": 2816, "heads": 16, "max_pos": 8192}
MAX_TOKENS = 32
NOTES_MARK = "<!-- notes: kept when the benchmark rewrites this file -->"
REQ_TIMEOUT = 600.0
# System prompt + tools, in tokens: the demo model has a 2048-token context, so its agents get
# a shorter system turn; 10 turns add about 700 tokens on top.
SYSTEM_TOKENS = {"demo": 1200, "big": 2000}

TARGETS = {
    "computed": 0.15,  # prefill tokens computed <= 15 % of the no-cache total
    "warm": 0.10,  # warm TTFT <= 0.1 x cold TTFT on the long prefix
    "restart": 0.20,  # after restart <= 20 % of the no-cache total
    "disk": 0.25,  # loading a disk slot < 25 % of recomputing the prefix
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the agents' prompts -------------------------------------------------------------------------
def _fn(name: str, desc: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": desc,
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


def _s(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "string", "description": desc, **kw}


def _i(desc: str, **kw: Any) -> dict[str, Any]:
    return {"type": "integer", "description": desc, **kw}


def tools_a() -> list[dict[str, Any]]:
    """A coding agent's tools."""
    return [
        _fn(
            "read_file",
            "Read a text file from the repository. Returns the lines with numbers.",
            {
                "path": _s("Path relative to the repository root."),
                "start_line": _i("First line to return, 1-based.", minimum=1),
                "end_line": _i("Last line to return, inclusive.", minimum=1),
            },
            ["path"],
        ),
        _fn(
            "write_file",
            "Create or overwrite a file with the given content.",
            {
                "path": _s("Path relative to the repository root."),
                "content": _s("The complete new content of the file."),
            },
            ["path", "content"],
        ),
        _fn(
            "edit_file",
            "Replace one exact occurrence of a string in a file.",
            {
                "path": _s("Path relative to the repository root."),
                "old": _s("The exact text to replace; must occur exactly once."),
                "new": _s("The replacement text."),
            },
            ["path", "old", "new"],
        ),
        _fn(
            "search_code",
            "Search the repository for a regular expression.",
            {
                "pattern": _s("A regular expression."),
                "glob": _s("Only files matching this glob, e.g. src/**/*.py."),
                "max_results": _i("At most this many matches.", minimum=1, maximum=200),
            },
            ["pattern"],
        ),
        _fn(
            "run_tests",
            "Run the test suite or a subset of it and return the summary.",
            {
                "selector": _s("A pytest node id or -k expression; empty runs everything."),
                "timeout_s": _i("Give up after this many seconds.", minimum=10, maximum=1800),
            },
            [],
        ),
        _fn(
            "run_command",
            "Run a shell command in the repository and return its output.",
            {
                "command": _s("The command line."),
                "cwd": _s("Working directory relative to the repository root."),
                "timeout_s": _i("Give up after this many seconds.", minimum=1, maximum=600),
            },
            ["command"],
        ),
        _fn(
            "git_diff",
            "Show the uncommitted changes, optionally for one path.",
            {
                "path": _s("Limit the diff to this path."),
                "staged": {"type": "boolean", "description": "Show staged changes only."},
            },
            [],
        ),
        _fn(
            "open_issue",
            "Fetch an issue or pull request with its comments.",
            {
                "number": _i("The issue number.", minimum=1),
                "include_comments": {"type": "boolean", "description": "Also return comments."},
            },
            ["number"],
        ),
    ]


def tools_b() -> list[dict[str, Any]]:
    """An operations / support agent's tools."""
    return [
        _fn(
            "lookup_order",
            "Find an order by its id or by the customer's email address.",
            {
                "order_id": _s("The order id, e.g. ORD-10442."),
                "email": _s("The customer's email address."),
            },
            [],
        ),
        _fn(
            "refund_order",
            "Refund an order in full or in part.",
            {
                "order_id": _s("The order id."),
                "amount": {"type": "number", "description": "Amount in the order's currency."},
                "reason": _s(
                    "Why the refund is given.",
                    enum=["damaged", "late", "wrong_item", "goodwill", "other"],
                ),
            },
            ["order_id", "amount", "reason"],
        ),
        _fn(
            "check_inventory",
            "Stock level of a product in every warehouse.",
            {
                "sku": _s("The product's SKU."),
                "warehouse": _s("Only this warehouse code, e.g. BER-1."),
            },
            ["sku"],
        ),
        _fn(
            "schedule_delivery",
            "Book a delivery slot for an order.",
            {
                "order_id": _s("The order id."),
                "date": _s("Delivery date, YYYY-MM-DD."),
                "window": _s("Time window.", enum=["morning", "afternoon", "evening"]),
            },
            ["order_id", "date"],
        ),
        _fn(
            "send_email",
            "Send an email to a customer using a template.",
            {
                "to": _s("Recipient address."),
                "template": _s(
                    "Template name.", enum=["refund_ok", "delay", "apology", "shipping_update"]
                ),
                "variables": {"type": "object", "description": "Values for the template."},
            },
            ["to", "template"],
        ),
        _fn(
            "get_weather",
            "Weather forecast for a city, for delivery planning.",
            {"city": _s("City name."), "days": _i("Days ahead.", minimum=1, maximum=7)},
            ["city"],
        ),
        _fn(
            "create_ticket",
            "Open an internal ticket for another team.",
            {
                "team": _s("Team.", enum=["warehouse", "billing", "engineering", "legal"]),
                "title": _s("One-line summary."),
                "body": _s("Details, with order ids."),
                "priority": _s("Priority.", enum=["low", "normal", "high", "urgent"]),
            },
            ["team", "title"],
        ),
        _fn(
            "query_metrics",
            "Query operational metrics for a time range.",
            {
                "metric": _s("Metric name, e.g. late_deliveries or refund_total."),
                "start": _s("Start date, YYYY-MM-DD."),
                "end": _s("End date, YYYY-MM-DD."),
                "group_by": _s("Optional dimension.", enum=["day", "warehouse", "carrier"]),
            },
            ["metric", "start", "end"],
        ),
    ]


_A_INTRO = """You are Forge, an autonomous software engineering agent working inside a Git repository for a team of developers. You read code, run tests and make careful, minimal changes. You work step by step: understand the request, look at the relevant files, plan, change, verify, and then report what you did."""
_B_INTRO = """You are Atlas, the operations assistant of an online store that ships furniture and home goods across Europe. You help the support team with orders, refunds, deliveries and stock questions. You are precise with money and dates, polite with customers, and you never guess an order's state: you look it up."""

_A_RULES = [
    "Before editing a file, read the part you change and the code that calls it.",
    "Keep each change as small as possible; do not reformat code you do not touch.",
    "Never commit, push or rewrite history unless the user asks for it explicitly.",
    "Run the tests that cover your change before you say that it works.",
    "If a test fails, read the failure, find the cause, and fix the code, not the test.",
    "Prefer the standard library and the project's existing helpers to new dependencies.",
    "Match the style of the surrounding code: naming, imports, type hints and docstrings.",
    "When a request is ambiguous, state your assumption in one sentence and continue.",
    "Do not print secrets, tokens or passwords, even if you find them in a file.",
    "Write new tests for every bug you fix, named after the behaviour they check.",
    "Use search_code to find every caller before you change a function's signature.",
    "Report the files you changed and the commands you ran at the end of your work.",
    "Long outputs waste context: ask for line ranges instead of whole files when you can.",
    "Treat warnings from the linter as errors in the files you change.",
    "If a command would delete data or touch production, stop and ask first.",
    "Use the git_diff tool to review your own change before you report it.",
]
_B_RULES = [
    "Always look an order up before you answer any question about it.",
    "Refunds above 200 euros need a ticket to billing with the order id and the reason.",
    "Never promise a delivery date that schedule_delivery did not confirm.",
    "Quote amounts with the currency and two decimals, for example 129.90 EUR.",
    "Dates are written as YYYY-MM-DD in tools and as 12 March 2025 in emails.",
    "If the stock of a product is below five units, say that it is limited.",
    "Customers who report damage get an apology email and a refund or a replacement.",
    "Check the weather for the delivery city when the customer asks about a late parcel.",
    "Do not share another customer's data, even if the same email appears twice.",
    "Escalate legal threats to the legal team with priority high and stop there.",
    "Be brief: three sentences are better than ten.",
    "When two tools disagree, trust lookup_order and open a ticket to engineering.",
    "Offer a goodwill refund of at most ten percent for a delay of more than five days.",
    "Write emails in the customer's language when it is English, German or French.",
    "Never change an order's address without the customer's written confirmation.",
    "Summarise what you did at the end of every conversation in one line.",
]
_A_TOPICS = [
    "the HTTP client",
    "the config loader",
    "the cache layer",
    "the CLI parser",
    "the database migrations",
    "the test fixtures",
    "the logging setup",
    "the retry policy",
    "the tokenizer wrapper",
    "the metrics exporter",
]
_B_TOPICS = [
    "late deliveries",
    "damaged sofas",
    "wrong colours",
    "missing screws",
    "double charges",
    "address changes",
    "gift cards",
    "bulk orders",
    "returns after thirty days",
    "carrier strikes",
]


def compact_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same tools without parameter descriptions (for the demo model's short context)."""
    out = []
    for t in tools:
        f, p = t["function"], t["function"]["parameters"]
        props = {
            k: {"type": v["type"], **({"enum": v["enum"]} if "enum" in v else {})}
            for k, v in p["properties"].items()
        }
        out.append(_fn(f["name"], f["description"], props, p["required"]))
    return out


def system_text(agent: str, n_rules: int, n_notes: int) -> str:
    intro, rules, topics, tools = (
        (_A_INTRO, _A_RULES, _A_TOPICS, tools_a())
        if agent == "A"
        else (_B_INTRO, _B_RULES, _B_TOPICS, tools_b())
    )
    names = [t["function"]["name"] for t in tools]
    parts = [intro]
    if n_rules:
        parts += ["", "## Rules", *[f"{i + 1}. {r}" for i, r in enumerate(rules[:n_rules])]]
    if n_notes:
        parts += ["", "## Notes from past work"]
    for i in range(n_notes):
        topic = topics[i % len(topics)]
        tool = names[(3 * i + 1) % len(names)]
        other = names[(5 * i + 2) % len(names)]
        rule = rules[(7 * i + 3) % len(rules)].rstrip(".").lower()
        parts.append(
            f"- Note {i + 1}: for questions about {topic}, start with {tool}, then use {other} "
            f"to confirm; remember that {rule}."
        )
    return "\n".join(parts)


def script(agent: str, turns: int) -> list[tuple[str, str]]:
    """The new message of each turn: (role, content); role 'tool' answers the last call."""
    if agent == "A":
        msgs = [
            (
                "user",
                "The retry policy in the HTTP client ignores the timeout setting. "
                "Find where the timeout is read and fix it.",
            ),
            (
                "tool",
                json.dumps(
                    {
                        "path": "src/http/client.py",
                        "lines": [
                            "41 def send(self, req):",
                            "42     for attempt in range(self.retries):",
                            "43         resp = self._once(req, timeout=None)",
                        ],
                    }
                ),
            ),
            ("user", "Good. Also check whether the config loader passes the timeout at all."),
            (
                "tool",
                json.dumps(
                    {
                        "matches": [
                            "src/config.py:88: timeout = raw.get('timeout')",
                            "src/http/client.py:12: self.timeout = timeout",
                        ]
                    }
                ),
            ),
            ("user", "Make the change and run the tests for the client."),
            (
                "tool",
                json.dumps(
                    {
                        "passed": 41,
                        "failed": 1,
                        "failures": [
                            "tests/test_client.py::test_retry_timeout - AssertionError: 30 != 5"
                        ],
                    }
                ),
            ),
            ("user", "Why does that test fail? Fix the code if the test is right."),
            ("tool", json.dumps({"passed": 42, "failed": 0, "duration_s": 3.1})),
            ("user", "Show me the diff and write a one-line changelog entry."),
            ("user", "Thanks. Is there any other place that builds a client without a timeout?"),
        ]
    else:
        msgs = [
            (
                "user",
                "A customer, anna.berg@example.com, says her sofa arrived with a torn "
                "cushion. What can we do?",
            ),
            (
                "tool",
                json.dumps(
                    {
                        "order_id": "ORD-10442",
                        "status": "delivered",
                        "total": "1249.00 EUR",
                        "delivered": "2025-03-10",
                        "items": [{"sku": "SOFA-OSLO-3-GRY", "qty": 1}],
                    }
                ),
            ),
            ("user", "She would prefer a replacement cushion rather than a refund."),
            ("tool", json.dumps({"sku": "CUSH-OSLO-GRY", "stock": {"BER-1": 3, "HAM-2": 0}})),
            ("user", "Book the delivery for next Tuesday if possible."),
            (
                "tool",
                json.dumps(
                    {
                        "order_id": "ORD-10442",
                        "date": "2025-03-18",
                        "window": "morning",
                        "confirmed": True,
                    }
                ),
            ),
            ("user", "Send her the apology email with the delivery date."),
            ("tool", json.dumps({"sent": True, "message_id": "m-77812"})),
            ("user", "How many damage cases did we have this month, by warehouse?"),
            ("user", "Open a ticket to the warehouse team about the packing of Oslo sofas."),
        ]
    while len(msgs) < turns:
        msgs.append(("user", f"Anything else to check? (follow-up {len(msgs) + 1})"))
    return msgs[:turns]


class Tok:
    """The model's tokenizer and chat template, to size the system turn in tokens."""

    def __init__(self, model: Path):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model))

    def count(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        text = self.tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=False
        )
        return len(self.tok.encode(text, add_special_tokens=False))


def make_agents(tok: Tok, target: int) -> dict[str, dict[str, Any]]:
    """System prompt + tools per agent, as close to `target` tokens as possible from below:
    full tool schemas and all rules if they fit (then notes are added), else fewer rules,
    else compact schemas (no parameter descriptions)."""
    agents = {}
    for name, full in (("A", tools_a()), ("B", tools_b())):
        n_all = len(_A_RULES if name == "A" else _B_RULES)

        def count(tools: list[dict[str, Any]], r: int, n: int, name: str = name) -> int:
            return tok.count([{"role": "system", "content": system_text(name, r, n)}], tools)

        choice = (compact_tools(full), 0, 0)
        for tools, min_rules in ((full, 6), (compact_tools(full), 0)):
            r = next(
                (r for r in range(n_all, min_rules - 1, -1) if count(tools, r, 0) <= target), None
            )
            if r is not None:
                choice = (tools, r, 0)
                break
        tools, r, _ = choice
        lo, hi = 0, 400 if r == n_all else 0
        while lo < hi:  # the most notes that still fit
            mid = (lo + hi + 1) // 2
            if count(tools, r, mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        sys_text = system_text(name, r, lo)
        total = tok.count([{"role": "system", "content": sys_text}], tools)
        agents[name] = {
            "system": sys_text,
            "tools": tools,
            "compact_tools": tools is not full,
            "rules": r,
            "notes": lo,
            "system_tokens": total,
            "tools_tokens": total - tok.count([{"role": "system", "content": sys_text}], None),
        }
    return agents


# -- streaming client ----------------------------------------------------------------------------
@dataclass
class Reply:
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft: float | None = None  # s, send -> first streamed chunk of a choice (the first token)
    ttft_content: float | None = None  # s, send -> first chunk with non-empty content / call
    first_chunk: float | None = None  # s, send -> first data event of any kind
    total: float | None = None
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # None: the server did not report it
    cache_header: str | None = None
    raw_usage: dict[str, Any] | None = None


def stream_chat(client: Any, url: str, body: dict[str, Any], timeout: float) -> Reply:
    rep = Reply()
    calls: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        with client.stream("POST", url, json=body, timeout=timeout) as resp:
            rep.status = resp.status_code
            rep.cache_header = resp.headers.get("x-mlxtg-cache")
            if resp.status_code != 200:
                rep.error = f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:800]}"
                return rep
            for line in resp.iter_lines():
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"timed out after {timeout:.0f}s")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter() - t0
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rep.error = f"error event: {json.dumps(obj)[:800]}"
                    return rep
                if rep.first_chunk is None:
                    rep.first_chunk = now
                if obj.get("usage"):
                    u = obj["usage"]
                    rep.raw_usage = u
                    rep.prompt_tokens = u.get("prompt_tokens")
                    rep.completion_tokens = u.get("completion_tokens")
                    det = u.get("prompt_tokens_details") or {}
                    if "cached_tokens" in det:
                        rep.cached_tokens = det["cached_tokens"]
                for ch in obj.get("choices") or []:
                    if rep.ttft is None:
                        rep.ttft = now
                    delta = ch.get("delta") or {}
                    got = False
                    if delta.get("content"):
                        rep.content += delta["content"]
                        got = True
                    for tc in delta.get("tool_calls") or []:
                        got = True
                        slot = calls.setdefault(
                            int(tc.get("index", len(calls))),
                            {
                                "id": None,
                                "type": "function",
                                "function": {"name": "", "arguments": ""},
                            },
                        )
                        if tc.get("id"):
                            slot["id"] = tc["id"]
                        fn = tc.get("function") or {}
                        if fn.get("name"):
                            slot["function"]["name"] += fn["name"]
                        if fn.get("arguments"):
                            slot["function"]["arguments"] += fn["arguments"]
                    if got and rep.ttft_content is None:
                        rep.ttft_content = now
                    if ch.get("finish_reason"):
                        rep.finish_reason = ch["finish_reason"]
        rep.total = time.perf_counter() - t0
        rep.tool_calls = [calls[k] for k in sorted(calls)]
        for i, c in enumerate(rep.tool_calls):
            c["id"] = c["id"] or f"call_{i}"
        rep.ok = True
        if rep.ttft is None:  # no choice chunk at all: count the first event instead
            rep.ttft = rep.first_chunk if rep.first_chunk is not None else rep.total
        if rep.ttft_content is None:
            rep.ttft_content = rep.total
    except Exception as exc:  # noqa: BLE001 - recorded, never raised
        rep.error = f"{type(exc).__name__}: {exc}"
    return rep


# -- servers -------------------------------------------------------------------------------------
class Server:
    name = "server"
    ready_path = "/health"

    def __init__(self, model: Path, blas: str | None, workdir: Path):
        self.model, self.blas, self.workdir = model, blas, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.base = ""
        self.model_field = "default_model"
        self.starts = 0
        self.cmd: list[str] = []
        self.env: dict[str, str] = {}
        self.log_path = workdir / f"{self.name}.log"
        self.start_s: list[float] = []

    def build(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 300.0) -> None:
        import httpx

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.build()
        self.starts += 1
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.log_file.write(
            f"\n==== {time.strftime('%H:%M:%S')} start {self.starts}: {shlex.join(self.cmd)}"
            f" (MLXTG_HOME={self.env.get('MLXTG_HOME', '-')})\n".encode()
        )
        self.log_file.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2.0).status_code == 200:
                    self.after_ready()
                    self.start_s.append(time.perf_counter() - t0)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def after_ready(self) -> None:
        pass

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc, signal.SIGINT, timeout=60)
            self.proc = None
        with contextlib.suppress(Exception):
            self.log_file.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def blas_in_use(self) -> str:
        import psutil

        if not self.proc:
            return "?"
        found = set()
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return "?"
        for p in procs:
            try:
                maps = Path(f"/proc/{p.pid}/maps").read_text()
            except OSError:
                continue
            if "libmlx" in maps:
                found.add("OpenBLAS" if "openblas" in maps.lower() else "bundled BLAS")
        return ",".join(sorted(found)) or "?"


class Mlxtg(Server):
    name = "mlxtg"
    ready_path = "/ready"

    def __init__(self, model: Path, blas: str | None, workdir: Path, home: Path):
        super().__init__(model, blas, workdir)
        self.home = home

    def build(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        exe = Path(PY).with_name("mlxtg")
        base = [str(exe)] if exe.exists() else [PY, "-m", "mlxtg"]
        self.cmd = [*base, "up", "--model", str(self.model), "--port", str(self.port)]
        if not self.blas:
            self.cmd.append("--no-fast-blas")
        self.env = env_without_preload(None)  # the supervisor preloads OpenBLAS into workers
        self.env["MLXTG_HOME"] = str(self.home)

    def after_ready(self) -> None:
        import httpx

        self.model_field = httpx.get(self.base + "/v1/models", timeout=5).json()["data"][0]["id"]

    def status(self) -> dict[str, Any]:
        import httpx

        try:
            return httpx.get(self.base + "/admin/status", timeout=10).json()
        except Exception as exc:  # noqa: BLE001
            return {"error": str(exc)}

    def stats(self) -> dict[str, Any]:
        """The worker's stats dict (the one holding prompt_tokens_computed)."""
        return _find_key(self.status(), "prompt_tokens_computed") or {}

    def settled_stats(self, timeout: float = 120.0) -> dict[str, Any]:
        """Stats once the heartbeat has caught up and the disk writer is idle: the same
        counters twice in a row, 1.5 s apart."""
        deadline = time.time() + timeout
        prev = None
        while time.time() < deadline:
            time.sleep(1.5)
            st = self.stats()
            key = (
                st.get("prompt_tokens_computed"),
                json.dumps(st.get("disk_cache"), sort_keys=True, default=str),
            )
            if prev is not None and key == prev:
                return st
            prev = key
        return self.stats()


class MlxLmServer(Server):
    name = "mlx_lm.server"

    def build(self) -> None:
        self.cmd = [
            PY,
            "-m",
            "mlx_lm.server",
            "--model",
            str(self.model),
            "--port",
            str(self.port),
            "--log-level",
            "INFO",
        ]
        self.env = env_without_preload(self.blas)


def _find_key(obj: Any, key: str) -> dict[str, Any] | None:
    if isinstance(obj, dict):
        if key in obj:
            return obj
        for v in obj.values():
            r = _find_key(v, key)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = _find_key(v, key)
            if r is not None:
                return r
    return None


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


def base_body(model_field: str, agent: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "model": model_field,
        "messages": [{"role": "system", "content": agent["system"]}],
        "tools": agent["tools"],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt_cache_key": key,
    }


def assistant_message(rep: Reply) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": rep.content}
    if rep.tool_calls:
        msg["tool_calls"] = rep.tool_calls
    return msg


def next_messages(
    prev: Reply | None, role: str, content: str, agent: str, turn: int
) -> list[dict[str, Any]]:
    if role == "tool":
        call_id = (
            prev.tool_calls[0]["id"]
            if prev is not None and prev.tool_calls
            else f"call_{agent}{turn}"
        )
        return [{"role": "tool", "tool_call_id": call_id, "content": content}]
    return [{"role": "user", "content": content}]


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
        srv = Mlxtg(model, blas, workdir, home)
        srv.log_path = workdir / "mlxtg-probe.log"
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
    mx = Mlxtg(model, blas, workdir, home)
    ml = MlxLmServer(model, blas, workdir)
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


# -- the bigger model --------------------------------------------------------------------------
def build_big(out: Path, tok_src: Path, seed: int = 0) -> dict[str, Any]:
    """Random-weight Llama, N(0, 0.02) for every matrix, fp32, with tok_src's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models.llama import Model, ModelArgs

    src = json.loads((tok_src / "config.json").read_text())
    c = BIG_CFG
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c["hidden"],
        "intermediate_size": c["intermediate"],
        "num_hidden_layers": c["layers"],
        "num_attention_heads": c["heads"],
        "num_key_value_heads": c["heads"],
        "head_dim": c["hidden"] // c["heads"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": c["max_pos"],
        "vocab_size": int(src["vocab_size"]),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "eos_token_id": src.get("eos_token_id"),
        "bos_token_id": src.get("bos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
    }
    mx.random.seed(seed)
    model = Model(
        ModelArgs(**{k: v for k, v in cfg.items() if k in ModelArgs.__dataclass_fields__})
    )
    model.update(
        tree_map(
            lambda p: mx.random.normal(p.shape) * 0.02 if p.ndim >= 2 else p, model.parameters()
        )
    )
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "pt"})
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        if (tok_src / name).exists():
            shutil.copy(tok_src / name, tmp / name)
    cfg["bench_params"] = int(sum(v.size for v in weights.values()))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {"path": str(out), "params": cfg["bench_params"]}


def ensure_big(tok_src: Path) -> Path:
    cfg_path = BIG_DIR / "config.json"
    if cfg_path.exists() and (BIG_DIR / "model.safetensors").exists():
        cfg = json.loads(cfg_path.read_text())
        same_tok = all(
            (BIG_DIR / n).read_bytes() == (tok_src / n).read_bytes()
            for n in ("tokenizer.json", "tokenizer_config.json")
            if (tok_src / n).exists()
        )
        if (
            same_tok
            and cfg.get("num_hidden_layers") == BIG_CFG["layers"]
            and cfg.get("hidden_size") == BIG_CFG["hidden"]
            and cfg.get("max_position_embeddings") == BIG_CFG["max_pos"]
        ):
            return BIG_DIR
    log(f"building the random-weight Llama in {BIG_DIR} ...")
    subprocess.run(
        [PY, "-m", "bench.bench_agent", "--build-big", str(tok_src)],
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    return BIG_DIR


# -- a quiet machine ---------------------------------------------------------------------------
# Other servers / benchmarks: wait for them. A training only adds load: noted, not waited for.
OTHERS = (
    "mlxtg up",
    "mlx_lm.server",
    "mlxtg.worker",
    "bench_serving",
    "build-llama",
    "mlxtg.gateway",
)
LOAD_ONLY = ("mlxtg.demo.train", "pytest")


def others_running(load_too: bool = False) -> list[str]:
    """Other benchmarks' servers and trainings (not this process's own children)."""
    import psutil

    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in mine:
            continue
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(o in cmd for o in (*OTHERS, *(LOAD_ONLY if load_too else ()))) and (
            "bench_agent" not in cmd
        ):
            out.append(f"pid {p.info['pid']}: {cmd[:110]}")
    return out


def wait_quiet(limit: float) -> list[str]:
    """Wait (up to `limit` s) until no other server / training runs; returns what still runs."""
    deadline = time.time() + limit
    said = False
    while True:
        busy = others_running()
        if not busy or time.time() > deadline:
            return busy
        if not said:
            log(f"waiting up to {limit:.0f}s for other runs to finish:\n  " + "\n  ".join(busy))
            said = True
        time.sleep(15)


def snapshot_demo(dst_root: Path) -> Path:
    """A private copy of the demo model (it may be retrained while this runs)."""
    from bench.common import wait_for_model

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
    ap.add_argument("--build-big", metavar="TOKENIZER_SRC", help=argparse.SUPPRESS)
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
    if a.build_big:
        print(json.dumps(build_big(BIG_DIR, Path(a.build_big))))
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
                plan.append(("big", ensure_big(DEMO_MODEL)))
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
