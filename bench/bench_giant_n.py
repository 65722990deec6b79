"""Fair admission with one request larger than the batch (issue 14).

One prompt asks for `n` choices (more than `max_batch` rows); once its first token streams, an
8-token request arrives. Prints how long each took. Before choices were admitted in slices the
short request waited for the whole giant; now it takes a row as soon as one frees.

    python -m bench.bench_giant_n --url http://127.0.0.1:8000 [--n 128] [--max-tokens 300]
"""

import argparse
import asyncio
import json
import time

import httpx


async def measure(url: str, model: str, n: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=1800) as http:
        streaming = asyncio.Event()

        async def giant() -> float:
            body = {
                "model": model,
                "prompt": "Chapter 1:",
                "n": n,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            start = time.monotonic()
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        streaming.set()
            return time.monotonic() - start

        big = asyncio.ensure_future(giant())
        await streaming.wait()
        start = time.monotonic()
        small = {"model": model, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
        r = await http.post(url + "/v1/completions", json=small)
        small_s = time.monotonic() - start
        return {
            "small_s": round(small_s, 2),
            "giant_s": round(await big, 2),
            "status": r.status_code,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="mlxtg-demo")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=300)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(measure(args.url, args.model, args.n, args.max_tokens))))


if __name__ == "__main__":
    main()
