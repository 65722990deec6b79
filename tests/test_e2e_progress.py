"""End-to-end: load progress (issue 15 item 4) through a real `mlxtg up`.

A tiny model quantises and loads in a fraction of a second, so the test reads the history
instead of racing the load: `mlxtg load`'s answer, the status's `last_load` phase timings
and the plain lines `mlxtg up` writes to its log when not on a terminal."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, Server, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):
    root = tmp_path_factory.mktemp("progress")
    broken = root / "broken"
    shutil.copytree(tiny_llama, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    config = root / "models.yaml"
    config.write_text(
        f"""
models:
  - {{model_id_or_path: {tiny_llama}, model_name: a}}
  - {{model_id_or_path: {tiny_llama}, model_name: a-q4, quant: q4}}
  - {{model_id_or_path: {broken}, model_name: broken}}
"""
    )
    server = start_server(root / "home", ["--config", str(config)])
    yield server
    assert server.stop() == 0, server.log.read_text()


def mlxtg(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxtg", *args],
        env={**srv.env(), "MLXTG_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=300,
    )


def entry(srv: Server, name: str) -> dict:
    return next(m for m in srv.status()["models"] if m["name"] == name)


def test_load_follows_a_quantising_load_until_ready_and_the_phases_stay_on_record(srv):
    done = mlxtg(srv, "load", "a-q4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("a-q4: loaded in "), done.stdout
    assert "quantize" in done.stdout  # the phases it went through

    m = entry(srv, "a-q4")
    assert m["state"] == "loaded" and m["progress"] is None  # the contract: null when loaded
    last = m["last_load"]
    assert last["ok"] and last["error"] is None
    assert [p for p in last["phases"] if p != "starting"] == ["quantize", "load", "warmup"]
    assert all(s >= 0 for s in last["phases"].values())
    assert all("progress" in other and other["progress"] is None for other in srv.status()["models"])

    # `mlxtg up` is not on a terminal here: plain lines in its log. The loop draws what it
    # sees each turn (phases of a few ms may pass between two), so: a line at the spawn,
    # and every phase with its time in the ready line.
    log = srv.log.read_text()
    assert "loading a-q4: starting" in log, log
    (ready,) = [line for line in log.splitlines() if "model a-q4 ready in " in line]
    assert all(f"{phase} " in ready for phase in ("quantize", "load", "warmup")), ready

    shown = mlxtg(srv, "status")
    assert shown.returncode == 0 and "loaded in" in shown.stdout and "quantize" in shown.stdout


def test_load_of_a_model_that_cannot_load_fails_with_its_error(srv):
    failed = mlxtg(srv, "load", "broken")
    assert failed.returncode == 1, failed.stdout
    assert "broken: failed to load:" in failed.stderr, failed.stderr
    m = entry(srv, "broken")
    assert m["state"] == "unloaded" and m["progress"] is None
    assert m["last_load"]["ok"] is False and m["last_load"]["error"]
    assert "load" in m["last_load"]["phases"]  # it got as far as reading the weights

    # Loading the same model again waits for this attempt, not the old failure's record.
    again = mlxtg(srv, "load", "broken")
    assert again.returncode == 1 and "failed to load" in again.stderr
    assert entry(srv, "broken")["last_load"]["finished_at"] > m["last_load"]["finished_at"]
