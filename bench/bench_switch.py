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
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "mlxtg" / "demo" / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


class Server:
    """`mlxtg up` in a subprocess with its own home; `args` are extra `up` flags."""

    def __init__(self, config: Path | None, home: Path, args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLXTG_HOME": str(home)}
        self.launched = time.perf_counter()
        self.log = (home / "server.log").open("wb")
        cmd = [sys.executable, "-m", "mlxtg", "up", "--port", str(self.port), *(args or [])]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def wait_http(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("gateway did not start")

    def evict_all(self) -> None:
        httpx.post(f"{self.url}/admin/evict", json={"model": None}, timeout=30).raise_for_status()
        time.sleep(0.5)

    def status(self) -> dict:
        return httpx.get(f"{self.url}/admin/status", timeout=10).json()

    def wait_standby(self) -> None:
        time.sleep(15)  # the standby spawns once nothing is loading; give it its imports

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self.log.close()


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
            srv = Server(write_config(home / "models.yaml", model, standby), home)
            try:
                srv.wait_http()
                ttft(srv.url, "a")
                if not standby:
                    out["cold start"].append(time.perf_counter() - srv.launched)
                for i in range(rounds):
                    if standby:
                        srv.wait_standby()
                        out["switch, standby worker"].append(
                            ttft(srv.url, "b" if i % 2 == 0 else "a")
                        )
                    else:
                        out["switch"].append(ttft(srv.url, "b"))  # "a" is resident
                        srv.evict_all()
                        out["cold load"].append(ttft(srv.url, "a"))
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
