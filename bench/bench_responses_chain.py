"""Does a chained Responses agent prefill as little as a chat-completions one?

    python -m bench.bench_responses_chain [--turns 10]

A fresh `mlxtg up` (demo model) per API. The same 10-turn conversation runs twice: through
`/v1/chat/completions`, resending the whole history each turn with a `prompt_cache_key`, and
through `/v1/responses`, sending only the new user turn with `previous_response_id`. Each
turn's prompt tokens and cached tokens come from the responses' own `usage`; "computed" is
prompt − cached, the prefill the worker actually ran.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import find_openblas, log
from bench.servers import Mlxtg

QUESTIONS = [
    "Tell me about the weather in Oslo.", "And in Paris?", "Which one is warmer?",
    "What should I pack?", "How long is the flight?", "Any food tips?", "What about trains?",
    "Is it expensive?", "Best month to go?", "Thanks, summarise please.",
]
SYSTEM = "You are a helpful travel assistant. " * 8


def chat_run(client: object, turns: int) -> list[tuple[int, int]]:
    history = [{"role": "system", "content": SYSTEM}]
    out = []
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        r = client.chat.completions.create(  # type: ignore[attr-defined]
            model="mlxtg-demo", messages=history, max_tokens=24, temperature=0.0,
            extra_body={"prompt_cache_key": "chat-agent"})
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        out.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
    return out


def responses_run(client: object, turns: int) -> list[tuple[int, int]]:
    prev, out = None, []
    for q in QUESTIONS[:turns]:
        r = client.responses.create(  # type: ignore[attr-defined]
            model="mlxtg-demo", input=q, instructions=SYSTEM, max_output_tokens=24,
            temperature=0.0, previous_response_id=prev)
        prev = r.id
        out.append((r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=10)
    args = ap.parse_args(argv)
    import openai

    rows = {}
    runs = (("chat completions + history", chat_run),
            ("responses + previous_response_id", responses_run))
    for name, run in runs:  # a fresh server and home each: no cache shared between the two
        with tempfile.TemporaryDirectory() as tmp:
            srv = Mlxtg(None, find_openblas(), Path(tmp))  # no model: the demo, as mlxtg-demo
            srv.start()
            try:
                client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0)
                rows[name] = run(client, args.turns)
            finally:
                srv.stop()
    print(f"Command: `python -m bench.bench_responses_chain --turns {args.turns}` (demo model).\n")
    print("| API | prompt tokens, all turns | cached | computed | computed per turn (turns 2+) |")
    print("|---|---:|---:|---:|---|")
    for name, turns in rows.items():
        prompt, cached = sum(p for p, _ in turns), sum(c for _, c in turns)
        later = ", ".join(str(p - c) for p, c in turns[1:])
        print(f"| {name} | {prompt} | {cached} | {prompt - cached} | {later} |")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
