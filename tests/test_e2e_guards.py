"""End-to-end guards on a default install (no API key, loopback): a cross-site page cannot
evict the model, a rebound Host is refused, a 50 MB body is refused while a stream keeps
flowing, and an abandoned stream counts as aborted in /metrics."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server

pytestmark = pytest.mark.slow

BIG = 50 << 20


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("guards"), ["--model", str(tiny_llama)], api_key=None
    )
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def chat(stream: bool, max_tokens: int) -> dict:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def test_a_cross_site_simple_post_cannot_evict(open_server: Server):
    url = open_server.url
    # What a web page's <form> or fetch() with a text/plain body sends, without a preflight.
    for path in ("/admin/evict", "/admin/cache/clear"):
        r = httpx.post(
            url + path,
            content=b'{"model": null}',
            headers={"Content-Type": "text/plain", "Origin": "http://evil.example"},
        )
        assert r.status_code == 415, r.text
        assert r.json()["error"]["code"] == "unsupported_media_type"
    assert [m["state"] for m in open_server.status()["models"]] == ["loaded"]


def test_a_rebound_host_is_refused(open_server: Server):
    port = open_server.port
    r = httpx.get(f"{open_server.url}/v1/models", headers={"Host": f"evil.example:{port}"})
    assert r.status_code == 403, r.text
    assert "--allowed-host" in r.json()["error"]["message"]
    assert httpx.get(
        f"{open_server.url}/v1/models", headers={"Host": f"localhost:{port}"}
    ).is_success
    health = httpx.get(f"{open_server.url}/health", headers={"Host": "evil.example"})
    assert health.status_code == 200


def _upload(url: str, chunked: bool) -> httpx.Response:
    def chunks() -> Iterator[bytes]:
        for _ in range(BIG >> 20):
            yield b" " * (1 << 20)

    content = chunks() if chunked else b" " * BIG
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers, timeout=120)


def test_a_50mb_body_is_413_while_a_stream_keeps_flowing(open_server: Server):
    url = open_server.url
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat(True, 200), timeout=120) as s:
        lines = s.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # the stream flows
        with ThreadPoolExecutor(2) as pool:
            uploads = [pool.submit(_upload, url, chunked) for chunked in (False, True)]
            events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
            answers = [u.result() for u in uploads]
    for r in answers:
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 200


def _requests_total(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        m[1]: float(m[2])
        for m in re.finditer(r'^mlxtg_requests_total\{status="(\w+)"\} (\S+)$', text, re.M)
    }


def test_an_abandoned_stream_counts_as_aborted(open_server: Server):
    url = open_server.url
    before = _requests_total(url)
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=chat(True, 1500), timeout=120
    ) as s:
        assert next(line for line in s.iter_lines() if line.startswith("data: {"))
    # Leaving the block closed the connection; the gateway notices it at its next send.
    deadline = time.monotonic() + 60
    while (now := _requests_total(url)).get("aborted", 0) == before.get("aborted", 0):
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert now["aborted"] == before.get("aborted", 0) + 1
    assert now.get("200", 0) == before.get("200", 0)
