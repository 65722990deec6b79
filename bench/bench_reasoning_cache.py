"""Prompt-cache hit rate of 5-turn conversations with reasoning templates (issue 12, item 4).

    python -m bench.bench_reasoning_cache [--turns 5] [--checkpoint-off] [--write]

The conversations of docs/reasoning-design.md section 6, through the real engine in this
process (Preprocessor + Engine + RamPrefixCache with the worker's own settings and miss
explanation): a system message (40 words), then each turn a user message (50 words) and a reply
forced by a guided grammar, greedy: 60 words of reasoning and a 20-word answer. The client sends
back the answer only, as OpenAI clients do. Three template styles (Qwen3 with thinking, Qwen3 with
`enable_thinking: false`, R1, whose generation prompt opens `<think>`), each on a tiny random
Llama (trimmable KV cache) and one with sliding-window layers (untrimmable, like gpt-oss, Gemma 3
or SSM hybrids). The models are tests/reasoning_models.py's. Hit = cached / prompt tokens over
turns 2..N, as each turn's ACCEPTED reports them.

`--checkpoint-off` adds a column with the preprocessed request's `tail_at` set to 0 (what the
preprocessor gives a prompt without a reasoning tail): no prefill boundary, no checkpoint before
the tail. The engine has no switch for it; the bench only clears that field.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, git_commit, log, machine_info, replace_section

HEADING = "## Reasoning conversations and the prompt cache (issue 12)"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "weather", "in",
         "oslo", "paris", "lima", "is", "sunny", "cold", "warm", "rain", "snow"]
# (label, template style, chat_template_kwargs, the template opens the block itself)
CONVERSATIONS = (
    ("Qwen3-style, thinking", "qwen3", None, False),
    ("Qwen3-style, `enable_thinking: false`", "qwen3", {"enable_thinking": False}, False),
    ("R1-style (template opens `<think>`)", "r1", None, True),
)
ARCHS = (("llama", "trimmable"), ("llama_swa", "untrimmable"))
# docs/reasoning-design.md section 6, column "today": measured by the design's script
# (measure4.py) on the code before ab60271 (46d2b42 era). Percent, by (label, arch).
BEFORE = {
    ("Qwen3-style, thinking", "llama"): 73.6, ("Qwen3-style, thinking", "llama_swa"): 73.6,
    ("Qwen3-style, `enable_thinking: false`", "llama"): 72.3,
    ("Qwen3-style, `enable_thinking: false`", "llama_swa"): 0.0,
    ("R1-style (template opens `<think>`)", "llama"): 73.2,
    ("R1-style (template opens `<think>`)", "llama_swa"): 0.0,
}


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + j * 3) % len(WORDS)] for j in range(n))


def build_models(out: Path) -> dict[tuple[str, str], Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from reasoning_models import build_reasoning_model

    return {(style, arch): build_reasoning_model(out / f"{style}_{arch}", style, arch=arch)
            for style in ("qwen3", "r1") for arch, _ in ARCHS}


def conversation(path: Path, kwargs: dict | None, opens: bool, turns: int,
                 checkpoint: bool) -> list[tuple[int, int, str | None]]:
    """(prompt tokens, cached tokens, miss reason) of each turn, on a fresh engine."""
    from mlxtg.models import ModelSpec
    from mlxtg.protocol import Accepted, ConstraintKind, Generate, GuidedSpec
    from mlxtg.protocol.specs import EngineSettings
    from mlxtg.worker.engine import Engine
    from mlxtg.worker.guided import GuidedCompiler
    from mlxtg.worker.loader import load
    from mlxtg.worker.params import SamplingParams
    from mlxtg.worker.prefix_cache import RamPrefixCache
    from mlxtg.worker.preprocess import Preprocessor
    from mlxtg.worker.prompt_cache import PromptCache
    from mlxtg.worker.reasoning import reasoning_at
    from mlxtg.worker.scheduler import Scheduler

    loaded = load(ModelSpec(model_id_or_path=str(path)))
    s = EngineSettings()  # the worker's defaults, built as worker/main.py builds them
    ram = RamPrefixCache(s.cache_ram_bytes, min_tokens=s.cache_min_tokens,
                         explain=reasoning_at(loaded.reasoning))
    guided = GuidedCompiler(loaded.tokenizer, loaded.vocab_size)
    scheduler = Scheduler(s.max_batch, s.max_queued, s.prefill_chunk,
                          idle_chunk_tokens=s.idle_prefill_chunk, padded=s.batched_prefill)
    engine = Engine(loaded, PromptCache(ram), guided, scheduler=scheduler,
                    batched_prefill=s.batched_prefill)
    pre = Preprocessor(loaded, guided)
    start, end = loaded.tokenizer.think_start_tokens[0], loaded.tokenizer.think_end_tokens[0]
    closed = bool(kwargs and kwargs.get("enable_thinking") is False)
    messages: list[dict[str, Any]] = [{"role": "system", "content": words(99, 40)}]
    rows = []
    for t in range(turns):
        messages.append({"role": "user", "content": words(t, 50)})
        answer = words(t + 20, 20)
        tail = json.dumps("\n\n" + answer)
        body = tail if closed else f"{json.dumps(chr(10) + words(t + 10, 60) + chr(10))} <[{end}]> {tail}"
        lark = f"start: {'' if opens or closed else f'<[{start}]> '}{body}\n"
        msg = Generate(request_id=f"t{t}", model="m",
                       params=SamplingParams(temperature=0.0, max_tokens=400),
                       messages=[dict(m) for m in messages], chat_template_kwargs=kwargs,
                       guided=GuidedSpec(ConstraintKind.GRAMMAR, lark, "guided_grammar"))
        req = pre(msg)
        if not checkpoint:
            req.payload.tail_at = 0
        inputs, accepted = [req], None
        for _ in range(5000):
            for m in engine.step(inputs):
                if isinstance(m, Accepted):
                    accepted = m
            inputs = []
            if engine.idle:
                break
        else:
            raise RuntimeError("the engine did not go idle")
        assert accepted is not None
        rows.append((accepted.prompt_tokens, accepted.cached_tokens, accepted.cache_miss_reason))
        messages.append({"role": "assistant", "content": answer})
    return rows


def hit(rows: list[tuple[int, int, str | None]]) -> float:
    later = rows[1:]
    return 100.0 * sum(c for _, c, _ in later) / max(sum(p for p, _, _ in later), 1)


def reasons(rows: list[tuple[int, int, str | None]]) -> str:
    """Miss reasons of turns 2..N, the token position replaced by N, with their counts."""
    seen: dict[str, int] = {}
    for _, _, r in rows[1:]:
        if r:
            key = r.rsplit("_", 1)[0] + "_N" if r[-1].isdigit() else r
            seen[key] = seen.get(key, 0) + 1
    return ", ".join(f"`{k}` ×{n}" for k, n in seen.items()) or "none"


def section(results: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> str:
    m = machine_info()
    cmd = "python -m bench.bench_reasoning_cache" + (" --checkpoint-off" if args.checkpoint_off else "")
    off = " | hit, `tail_at` = 0 (no checkpoint)" if args.checkpoint_off else ""
    lines = [
        HEADING, "",
        f"Command: `{cmd} --write`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"commit {git_commit()}, {wall:.0f} s wall; {m['cpu']}, {m['cores']} cores, {m['os']}, "
        f"Python {m['python']}, mlx {m['mlx']}, mlx-lm {m['mlx_lm']}.",
        "",
        f"{args.turns}-turn conversations of docs/reasoning-design.md section 6 through the real "
        "engine in-process (worker defaults: RAM prefix cache, prefill chunk 512, batched prefill): "
        "system 40 words, user 50, forced replies of 60 words of reasoning and a 20-word answer, "
        "greedy; the client sends back the answer only. Tiny random Llamas from "
        "tests/reasoning_models.py: trimmable KV, or untrimmable with sliding-window layers. "
        "Hit = cached / prompt tokens over turns 2..N as ACCEPTED reports them; the ceiling is "
        "about 80 % (each turn's new user message cannot be cached).",
        "",
        "\"Before the fix\" is the design's column \"today\" (docs/reasoning-design.md, section 6 "
        "\"Prompt cache: measured, then raised\"), measured by the design's script (measure4.py, "
        "the same conversations, engine settings of its own) on 46d2b42-era code, before ab60271 "
        "(checkpoint before the template's reasoning tail; `reasoning_dropped_at_token_N`)."
        + (" The `tail_at` = 0 column reruns each conversation with the preprocessed request's "
           "`tail_at` cleared (no boundary, no checkpoint; the engine has no switch, the bench "
           "clears the field)." if args.checkpoint_off else ""),
        "",
        f"| conversation | cache | prompt tokens, turns 2..{args.turns} | cached tokens | "
        f"hit before the fix | hit now{off} | miss reasons now |",
        "|---|---|---|---|--:|--:|" + ("--:|" if args.checkpoint_off else "") + "---|",
    ]
    for r in results:
        later = r["rows"][1:]
        lines.append(
            f"| {r['label']} | {r['cache']} | {', '.join(str(p) for p, _, _ in later)} | "
            f"{', '.join(str(c) for _, c, _ in later)} | {r['before']:.1f} % | "
            f"**{hit(r['rows']):.1f} %**"
            + (f" | {hit(r['off']):.1f} %" if "off" in r else "")
            + f" | {reasons(r['rows'])} |")
    lines += [
        "",
        "- Miss reasons: a trimmable cache is sliced where the stored turn diverges, at the dropped "
        "reasoning (`reasoning_dropped_at_token_N`); an untrimmable one resumes from an exact "
        "checkpoint, the prompt's end or, since ab60271, the point just before the reasoning tail, "
        "so no divergence is reported.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--checkpoint-off", action="store_true",
                    help="also run each conversation with the request's tail_at cleared")
    ap.add_argument("--write", action="store_true", help="write the section into bench/RESULTS.md")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        for label, style, kwargs, opens in CONVERSATIONS:
            for arch, cache in ARCHS:
                r: dict[str, Any] = {"label": label, "cache": cache, "before": BEFORE[label, arch]}
                r["rows"] = conversation(models[style, arch], kwargs, opens, args.turns, True)
                if args.checkpoint_off:
                    r["off"] = conversation(models[style, arch], kwargs, opens, args.turns, False)
                log(f"{label} / {cache}: {hit(r['rows']):.1f} % (before {r['before']:.1f} %"
                    + (f", tail_at=0 {hit(r['off']):.1f} %" if "off" in r else "") + f"); {r['rows']}")
                results.append(r)
    text = section(results, args, time.perf_counter() - t0)
    print(text)
    if args.write:
        replace_section(ROOT / "bench" / "RESULTS.md", HEADING, text)
        log("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
