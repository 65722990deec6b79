"""End-to-end: SIGTERM drains. New requests get 503 with Retry-After and /ready goes 503
while the streams in flight finish; what outlives --drain-timeout ends with an error event
and [DONE]; `mlxtg up` exits 0 only when nothing was cut."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from conftest import start_server

pytestmark = pytest.mark.slow

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}


def _events(lines: list[str]) -> list[dict]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def test_sigterm_lets_streams_in_flight_finish_and_refuses_new_ones(
    tmp_path: Path, tiny_llama: Path
):
    srv = start_server(tmp_path / "home", ["--model", str(tiny_llama)], api_key=None)
    stream_body = BODY | {"max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{srv.url}/v1/chat/completions", json=stream_body, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(lines)]
        srv.proc.send_signal(signal.SIGTERM)
        # Draining: not ready, and a new request is refused in OpenAI's shape.
        for _ in range(100):
            ready = httpx.get(f"{srv.url}/ready", timeout=10)
            if ready.status_code == 503:
                break
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(f"{srv.url}/v1/chat/completions", json=BODY, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["retry-after"]) >= 1
        seen += list(lines)
    chunks = _events(seen)
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert seen[-1] == "data: [DONE]" or [x for x in seen if x][-1] == "data: [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    assert srv.proc.wait(timeout=60) == 0, srv.log.read_text()


def test_what_outlives_the_drain_timeout_is_cut_with_an_error_event(
    tmp_path: Path, tiny_llama: Path
):
    srv = start_server(
        tmp_path / "home", ["--model", str(tiny_llama), "--drain-timeout", "0"], api_key=None
    )
    stream_body = BODY | {"max_tokens": 1800, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{srv.url}/v1/chat/completions", json=stream_body, timeout=60
    ) as r:
        lines = r.iter_lines()
        seen = [next(lines)]
        srv.proc.send_signal(signal.SIGTERM)
        seen += list(lines)
    errors = [c for c in _events(seen) if "error" in c]
    assert errors and errors[0]["error"]["code"] == "shutting_down", seen[-5:]
    assert [x for x in seen if x][-1] == "data: [DONE]"
    # Something was cut: exit non-zero, so a service manager can tell.
    assert srv.proc.wait(timeout=60) == 1, srv.log.read_text()
    assert "cut 1 request" in srv.log.read_text()
