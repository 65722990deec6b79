"""The agent workload of `bench.bench_agent`: two agents' system prompts, tool schemas and scripts.

Agent A is a coding agent, agent B a store-operations assistant; each has 8 tool JSON schemas.
`make_agents` sizes each system turn (prompt + tools, chat template applied) to a token target
with the model's own tokenizer; `script` gives each turn's user or tool message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.streams import Reply

MAX_TOKENS = 32  # per reply
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


# -- request bodies --------------------------------------------------------------------------------
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
