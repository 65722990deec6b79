"""Benchmark guided decoding: schema compile time and per-token mask time.

Tokenizers are byte-level BPEs trained here on generated text (no hub downloads), so the
numbers show llguidance's cost on this machine, not on a particular model's vocabulary.

    python bench/bench_guided.py [--vocab 4000 32000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlxtg.worker.guided import GuidedCompiler, GuidedSpec, apply_masks  # noqa: E402


def build_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE trained on pseudo-words, JSON and numbers, with eos <|im_end|>."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    syl = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]

    def word() -> str:
        return "".join(rng.choice(syl) for _ in range(rng.randint(1, 4)))

    lines = []
    for _ in range(max(2000, vocab_size)):
        lines.append(" ".join(word() for _ in range(10)) + f" {rng.randint(0, 10**6)}")
        lines.append(json.dumps({word(): [rng.random(), word(), None, True]}))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Address(_Strict):
    street: str
    city: str
    zip: str = Field(pattern=r"^\d{5}(-\d{4})?$")
    country: Literal["US", "CA", "MX"]


class LineItem(_Strict):
    sku: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")
    quantity: int = Field(ge=1, le=1000)
    unit_price: float = Field(ge=0)


class Order(_Strict):
    id: str
    customer: str
    shipping: Address
    billing: Address | None = None
    items: list[LineItem] = Field(min_length=1, max_length=20)
    status: Literal["pending", "paid", "shipped", "cancelled"]


class Card(_Strict):
    method: Literal["card"]
    last4: str = Field(pattern=r"^\d{4}$")


class Transfer(_Strict):
    method: Literal["transfer"]
    iban: str = Field(max_length=34)


class Payment(_Strict):
    amount: float
    currency: Literal["USD", "EUR", "GBP"]
    via: Card | Transfer = Field(discriminator="method")


def schemas() -> dict[str, dict[str, Any]]:
    """Twelve realistic schemas: nested objects, arrays, enums, $ref, anyOf, patterns."""
    s: dict[str, Any] = {"type": "string"}
    return {
        "order_pydantic_refs": Order.model_json_schema(),
        "payment_oneof_union": Payment.model_json_schema(),
        "address_patterns": Address.model_json_schema(),
        "weather_tool_args": {
            "type": "object",
            "properties": {
                "city": s,
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city"],
        },
        "person_nested": {
            "type": "object",
            "properties": {
                "name": {
                    "type": "object",
                    "properties": {"first": s, "last": s},
                    "required": ["first", "last"],
                },
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "emails": {
                    "type": "array",
                    "items": {"type": "string", "format": "email"},
                    "maxItems": 3,
                },
                "employer": {
                    "anyOf": [
                        {"type": "null"},
                        {
                            "type": "object",
                            "properties": {
                                "name": s,
                                "since": {"type": "string", "format": "date"},
                            },
                        },
                    ]
                },
            },
            "required": ["name", "age"],
        },
        "sentiment_enum": {
            "type": "object",
            "properties": {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["label", "confidence"],
            "additionalProperties": False,
        },
        "entities_array": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "text": s,
                    "type": {"enum": ["PER", "ORG", "LOC", "MISC"]},
                    "start": {"type": "integer"},
                    "end": {"type": "integer"},
                },
                "required": ["text", "type", "start", "end"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 50,
        },
        "github_issue": {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 120},
                "labels": {
                    "type": "array",
                    "items": {"enum": ["bug", "feature", "docs", "question"]},
                },
                "assignee": {
                    "anyOf": [{"type": "string", "pattern": "^[a-z0-9-]{1,39}$"}, {"type": "null"}]
                },
                "priority": {"type": "integer", "minimum": 1, "maximum": 5},
                "body": s,
            },
            "required": ["title", "labels", "priority"],
            "additionalProperties": False,
        },
        "tree_recursive_ref": {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "value": {"type": "integer"},
                        "children": {
                            "type": "array",
                            "items": {"$ref": "#/$defs/node"},
                            "maxItems": 3,
                        },
                    },
                    "required": ["value"],
                }
            },
            "$ref": "#/$defs/node",
        },
        "invoice_formats": {
            "type": "object",
            "properties": {
                "invoice_id": {"type": "string", "format": "uuid"},
                "issued": {"type": "string", "format": "date-time"},
                "total": {"type": "number", "exclusiveMinimum": 0},
                "lines": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"desc": s, "amount": {"type": "number"}},
                        "required": ["desc", "amount"],
                    },
                },
            },
            "required": ["invoice_id", "issued", "total", "lines"],
        },
        "calendar_event": {
            "type": "object",
            "properties": {
                "summary": s,
                "start": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}$"},
                "duration_min": {"type": "integer", "enum": [15, 30, 45, 60, 90]},
                "attendees": {
                    "type": "array",
                    "items": {"type": "string", "format": "email"},
                    "minItems": 1,
                    "maxItems": 10,
                },
                "recurrence": {
                    "anyOf": [{"enum": ["daily", "weekly", "monthly"]}, {"type": "null"}]
                },
            },
            "required": ["summary", "start", "duration_min", "attendees"],
            "additionalProperties": False,
        },
        "classification_multi": {
            "type": "object",
            "properties": {f"q{i}": {"enum": ["yes", "no", "unsure"]} for i in range(20)},
            "required": [f"q{i}" for i in range(20)],
            "additionalProperties": False,
        },
    }


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def bench_compile(
    c: GuidedCompiler, specs: list[GuidedSpec], rounds: int
) -> dict[str, list[float]]:
    """Cold compile (cache cleared), first mask after it, and cached new_state."""
    out: dict[str, list[float]] = {"compile (cold)": [], "first mask": [], "new_state (cached)": []}
    for _ in range(rounds):
        c.clear_cache()
        for spec in specs:
            t0 = time.perf_counter()
            c.validate(spec)
            t1 = time.perf_counter()
            state = c.new_state(spec)
            t2 = time.perf_counter()
            c.fill_masks([state])
            t3 = time.perf_counter()
            out["compile (cold)"].append((t1 - t0) * 1e3)
            out["new_state (cached)"].append((t2 - t1) * 1e3)
            out["first mask"].append((t3 - t2) * 1e3)
    return out


def bench_masks(
    c: GuidedCompiler, tok: Any, specs: list[GuidedSpec], batch: int, steps: int
) -> dict[str, list[float]]:
    """Per-step mask times for a full batch of states sampled from random logits (a finished
    state is replaced by a fresh one): bool masks, packed masks, and applying each in MLX."""
    import mlx.core as mx

    rng = np.random.default_rng(batch)
    bias = np.zeros(c.vocab_size)  # favour closing tokens so outputs keep cycling
    for i in range(len(tok)):
        if any(ch in tok.decode([i]) for ch in '"]},'):
            bias[i] = 3.0
    bias[tok.eos_token_id] = 3.0
    states = [c.new_state(specs[i % len(specs)]) for i in range(batch)]
    logits_mx = mx.random.normal((batch, c.vocab_size))
    rows = list(range(batch))
    names = (
        "fill_masks (bool)",
        "apply_masks (bool)",
        "fill_bitmask (packed)",
        "apply_masks (packed)",
    )
    out: dict[str, list[float]] = {k: [] for k in names}
    for step in range(steps):
        t = [time.perf_counter()]
        masks = c.fill_masks(states)
        t.append(time.perf_counter())
        mx.eval(apply_masks(logits_mx, rows, masks))
        t.append(time.perf_counter())
        packed = c.fill_bitmask(states)
        t.append(time.perf_counter())
        mx.eval(apply_masks(logits_mx, rows, packed))
        t.append(time.perf_counter())
        for k, a, b in zip(names, t[:-1], t[1:], strict=True):
            out[k].append((b - a) * 1e3)
        logits = np.where(masks, rng.standard_normal(masks.shape) + bias, -np.inf)
        for i, s in enumerate(states):
            s.consume(int(np.argmax(logits[i])))
            if s.is_finished():
                states[i] = c.new_state(specs[(i + step) % len(specs)])
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--vocab", type=int, nargs="+", default=[4000, 32000])
    ap.add_argument("--rounds", type=int, default=5, help="cold-compile rounds over all schemas")
    ap.add_argument("--steps", type=int, default=300, help="decode steps per batch size")
    ap.add_argument("--threads", type=int, default=None, help="llguidance mask threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)

    import llguidance
    import mlx.core as mx

    device = str(mx.default_device()).removeprefix("Device(").removesuffix(", 0)")

    specs = [GuidedSpec("json", json.dumps(s)) for s in schemas().values()]
    rows = []
    for vocab in args.vocab:
        t0 = time.perf_counter()
        tok = build_tokenizer(vocab)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        c = GuidedCompiler(tok, vocab_size=len(tok) + 64, num_threads=args.threads)
        setup_ms = (time.perf_counter() - t0) * 1e3
        name = f"BPE {len(tok) // 1000}k"
        print(
            f"{name}: trained in {train_s:.1f} s, compiler setup {setup_ms:.0f} ms", file=sys.stderr
        )
        for metric, xs in bench_compile(c, specs, args.rounds).items():
            rows.append((name, f"{metric}, {len(specs)} schemas", xs))
        for batch in (1, 16):
            for metric, xs in bench_masks(c, tok, specs, batch, args.steps).items():
                where = f"MLX {device}, " if metric.startswith("apply") else ""
                rows.append((name, f"{metric}, {where}batch {batch}, per step", xs))
    lines = [
        f"llguidance {llguidance.__version__}; {args.rounds} cold rounds; {args.steps} decode "
        f"steps per batch; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "",
        "| tokenizer | measurement | p50 ms | p99 ms | n |",
        "|---|---|---:|---:|---:|",
    ]
    for name, metric, xs in rows:
        lines.append(f"| {name} | {metric} | {pct(xs, 50):.3f} | {pct(xs, 99):.3f} | {len(xs)} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
