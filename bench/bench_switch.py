"""Model switch time: evict + load + first token, against a cold load alone.

    python -m bench.bench_switch [--model PATH] [--rounds 3] [--out bench/RESULTS-switch.md]

Serves the same weights under two names (so both loads cost the same) with
`max_resident_models: 1`, and measures time to first token of a streamed request:
  cold start   fresh `mlxtg up`: process launch -> first token of the first request
  cold load    nothing resident (after `evict --all`), no standby -> first token
  switch       the other model resident and idle -> first token (evict + load + token)
  switch, standby worker   the same with the default standby worker of multi-model configs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # `python bench/bench_switch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"  # noqa: A001

from bench.common import DEMO_MODEL as DEMO  # noqa: E402
from bench.common import find_openblas  # noqa: E402
from bench.servers import Mlxtg  # noqa: E402


def ttft(url: str, model: str, timeout: float = 600) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "stream": True,
    }
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
            if line.startswith("data: {") and '"finish_reason":"' in line:
                return time.perf_counter() - started
    raise RuntimeError("stream ended without a token")


def start(config: Path, home: Path) -> Mlxtg:
    """`mlxtg up --config` with its own home; ready as soon as the gateway answers /health,
    so `launched` -> first token is the whole cold start."""
    srv = Mlxtg(None, find_openblas(), home, home=home, config=config, log_name="server.log")
    srv.ready_path = "/health"
    srv.start(timeout=300, poll=0.05)
    return srv


def wait_standby() -> None:
    time.sleep(15)  # the standby spawns once nothing is loading; give it its imports


def write_config(path: Path, model: Path, standby: bool) -> Path:
    path.write_text(
        f"max_resident_models: 1\nstandby_worker: {str(standby).lower()}\nmodels:\n"
        f"  - {{model_id_or_path: {model}, model_name: a}}\n"
        f"  - {{model_id_or_path: {model}, model_name: b}}\n"
    )
    return path


def measure(model: Path, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "cold start": [],
        "cold load": [],
        "switch": [],
        "switch, standby worker": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for standby in (False, True):
            home = Path(tmp) / f"home-{standby}"
            home.mkdir()
            srv = start(write_config(home / "models.yaml", model, standby), home)
            try:
                ttft(srv.base, "a")
                if not standby:
                    out["cold start"].append(time.perf_counter() - srv.launched)
                for i in range(rounds):
                    if standby:
                        wait_standby()
                        out["switch, standby worker"].append(
                            ttft(srv.base, "b" if i % 2 == 0 else "a")
                        )
                    else:
                        out["switch"].append(ttft(srv.base, "b"))  # "a" is resident
                        srv.evict_all()
                        out["cold load"].append(ttft(srv.base, "a"))
            finally:
                srv.stop()
    return out


def table(model: Path, results: dict[str, list[float]]) -> str:
    cold = statistics.median(results["cold load"])
    rows = [
        f"| {model.name} | {name} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | {statistics.median(v) / cold:.2f}x |"
        for name, v in results.items()
        if v
    ]
    return "\n".join(
        [
            "| model | measurement | median s | min s | max s | vs cold load |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    models = args.model or [DEMO]
    parts = []
    for m in models:
        res = measure(m, args.rounds)
        print(json.dumps(res, indent=1), file=sys.stderr)
        parts.append(table(m, res))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
