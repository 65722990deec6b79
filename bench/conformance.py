"""`make conformance`: schemathesis against mlxtg's own /openapi.json, on a real `mlxtg up`.

Starts the demo model under a temporary MLXTG_HOME, runs positive and negative cases for
every operation except the admin routes that change state (evict, load, cache clear), with
the checks that compare answers with the document: no 5xx, documented status codes, content
types, headers and response bodies (SSE events included). The hooks in
`bench/conformance_hooks.py` pin the model name and small token budgets.

    python -m bench.conformance [--max-examples N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,response_headers_conformance"
)
EXCLUDE = r"^/admin/(evict|load|cache/clear)"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="mlxtg-conformance-") as home:
        env = {**os.environ, "MLXTG_HOME": home}
        log = open(Path(home) / "server.log", "w")  # noqa: SIM115 (closed with the server)
        server = subprocess.Popen(
            [str(bin_dir / "mlxtg"), "up", "--port", str(port)], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    print((Path(home) / "server.log").read_text()[-3000:])
                    return 1
                time.sleep(0.5)
            cmd = [
                str(bin_dir / "st"), "run", f"http://127.0.0.1:{port}/openapi.json",
                "--checks", CHECKS, "--exclude-path-regex", EXCLUDE,
                "--max-examples", str(args.max_examples), "--request-timeout", "60",
                "--workers", "2",
            ]
            if args.seed is not None:
                cmd += ["--seed", str(args.seed)]
            env_st = {**env, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "bench.conformance_hooks"}
            return subprocess.run(cmd, env=env_st, cwd=ROOT).returncode
        finally:
            server.terminate()
            server.wait(timeout=60)
            log.close()


if __name__ == "__main__":
    raise SystemExit(main())
