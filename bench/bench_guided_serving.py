"""Constrained vs unconstrained decode throughput through the real server.

    python -m bench.bench_guided_serving [--model PATH]... [--concurrency 1,16] [--max-tokens 64]

Both runs generate exactly `max_tokens` tokens per request: the constraint is a JSON schema
(an array of at least 200 short strings) that cannot complete within `max_tokens`, and EOS is
not allowed inside it anyway; the free run uses `ignore_eos`. Aggregate tokens/s = all
completion tokens / wall time. The worker's own counters give the mask time per token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # `python bench/bench_guided_serving.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import DEMO_MODEL as DEMO  # noqa: E402
from bench.common import find_openblas  # noqa: E402
from bench.servers import Mlxtg  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 200}
    },
    "required": ["notes"],
}


async def run(
    url: str, model: str, concurrency: int, max_tokens: int, guided: bool
) -> tuple[float, int]:
    extra = {"guided_json": SCHEMA} if guided else {"ignore_eos": True}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write notes."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        **extra,
    }
    async with httpx.AsyncClient(timeout=600) as http:

        async def one(i: int) -> int:
            r = await http.post(f"{url}/v1/chat/completions", json=body | {"seed": i})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(concurrency)))
        return time.perf_counter() - started, sum(tokens)


def guided_stats(srv: Mlxtg) -> dict:
    return dict(srv.worker()["stats"]["guided"])


def measure(model: Path, concurrencies: list[int], max_tokens: int, repeats: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        srv = Mlxtg(model, find_openblas(), Path(tmp), extra=["--cache-ram-gb", "0", "--cache-disk-gb", "0"])
        try:
            srv.start(timeout=600)
            name = srv.model_field
            asyncio.run(run(srv.base, name, 2, 8, True))  # warm up (compiles the schema once)
            asyncio.run(run(srv.base, name, 2, 8, False))
            for c in concurrencies:
                free, constrained, mask_ms = [], [], []
                for _ in range(repeats):
                    wall, tokens = asyncio.run(run(srv.base, name, c, max_tokens, False))
                    free.append(tokens / wall)
                    time.sleep(1.2)  # let a heartbeat carry fresh counters
                    before = guided_stats(srv)
                    wall, tokens = asyncio.run(run(srv.base, name, c, max_tokens, True))
                    constrained.append(tokens / wall)
                    time.sleep(1.2)
                    after = guided_stats(srv)
                    masked = after["masked_tokens"] - before["masked_tokens"]
                    if masked:
                        mask_ms.append(
                            1000 * (after["mask_seconds"] - before["mask_seconds"]) / masked
                        )
                f, g = statistics.median(free), statistics.median(constrained)
                per_token = f"{statistics.median(mask_ms):.3f}" if mask_ms else "-"
                rows.append(
                    f"| {model.name} | {c} | {f:.1f} | {g:.1f} | {g / f:.2f}x | {per_token} |"
                )
                print(rows[-1], flush=True)
        finally:
            srv.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, action="append")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    header = [
        "| model | streams | unconstrained tok/s | constrained tok/s | ratio | mask ms per constrained token (in the loop) |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for m in args.model or [DEMO]:
        rows += measure(
            m, [int(c) for c in args.concurrency.split(",")], args.max_tokens, args.repeats
        )
    text = "\n".join(header + rows)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
