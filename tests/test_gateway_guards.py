"""Gateway guards in process (httpx.ASGITransport, a stub supervisor client): the Host check,
JSON-only admin POSTs, the key on the API docs, the body limit and the per-request caps."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from mlxtg.gateway.app import create_app
from mlxtg.gateway.errors import Unavailable
from mlxtg.gateway.guards import host_name, is_loopback
from mlxtg.gateway.settings import GatewaySettings

HELLO = [{"role": "user", "content": "hi"}]


class StubSupervisor:
    """Answers control requests; refuses to generate (a 503 past every guard)."""

    def __init__(self, context_length: int | None = 64, state: str = "loaded"):
        self.calls: list[tuple[str, Any]] = []
        self.model = {"name": "m", "state": state, "context_length": context_length}

    async def control(self, op: str, args: Any = None, timeout: float = 5.0) -> Any:
        self.calls.append((op, args))
        data = {"models": [self.model]} if op == "status" else {"models": {"m": "evicted"}}
        return SimpleNamespace(ok=True, data=data, error=None)

    @contextlib.asynccontextmanager
    async def generate(self, gen: Any, queue: Any = None) -> AsyncIterator[None]:
        raise Unavailable("no worker in this test")
        yield


def client(
    base_url: str = "http://127.0.0.1:5001", stub: StubSupervisor | None = None, **settings: Any
) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(supervisor_endpoint="ipc:///tmp/none", **settings))
    app.state.client = stub or StubSupervisor()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def anthropic_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return dict(body["error"])


# --- Host check -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:5001", "localhost"),
        ("LocalHost.", "localhost"),
        ("[::1]:5001", "::1"),
        ("::1", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("evil.example:80", "evil.example"),
    ],
)
def test_host_name(header, name):
    assert host_name(header) == name


def test_loopback_names():
    assert all(map(is_loopback, ["localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "localhost.evil.example"]))


@pytest.mark.parametrize("host", ["localhost:5001", "127.0.0.1", "[::1]:5001", "mybox.lan:9"])
async def test_loopback_server_answers_its_own_names_and_the_allow_list(host):
    async with client(allowed_hosts=["mybox.lan"]) as c:
        r = await c.get("/openapi.json", headers={"Host": host})
        assert r.status_code == 200, r.text


async def test_other_hosts_are_refused_in_the_routes_error_shape():
    rebound = {"Host": "evil.example:5001"}
    async with client() as c:
        err = openai_error(await c.get("/v1/models", headers=rebound), 403)
        assert "evil.example" in err["message"] and "--allowed-host" in err["message"]
        assert err["code"] == "host_not_allowed"
        openai_error(await c.post("/admin/evict", json={}, headers=rebound), 403)
        openai_error(await c.get("/openapi.json", headers=rebound), 403)
        r = await c.post("/v1/messages", json={}, headers=rebound)
        assert anthropic_error(r, 403)["type"] == "permission_error"
        assert (await c.get("/health", headers=rebound)).status_code == 200  # probes


@pytest.mark.parametrize("settings", [{"host": "0.0.0.0"}, {"allowed_hosts": ["*"]}])
async def test_no_host_check_when_exposed_or_allowed_for_all(settings):
    async with client(**settings) as c:
        r = await c.get("/openapi.json", headers={"Host": "evil.example"})
        assert r.status_code == 200


# --- admin POSTs take JSON ---------------------------------------------------------------------


async def test_cross_site_simple_posts_to_admin_routes_are_refused():
    stub = StubSupervisor()
    async with client(stub=stub) as c:
        for path in ("/admin/evict", "/admin/cache/clear", "/admin/load"):
            text = await c.post(
                path, content=b'{"model": "m"}', headers={"Content-Type": "text/plain"}
            )
            assert "application/json" in openai_error(text, 415)["message"]
            form = await c.post(path, data={"model": "m"})
            assert openai_error(form, 415)["code"] == "unsupported_media_type"
            assert openai_error(await c.post(path), 415)["type"] == "invalid_request_error"
        assert stub.calls == []
        r = await c.post("/admin/evict", json={"model": "m"})
        assert r.status_code == 200 and stub.calls == [("evict", {"model": "m"})]
        r = await c.post(
            "/admin/cache/clear",
            content=b"{}",
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert r.status_code == 200


async def test_the_key_is_checked_before_the_content_type():
    async with client(api_keys=["k"]) as c:
        r = await c.post("/admin/evict", content=b"", headers={"Content-Type": "text/plain"})
        openai_error(r, 401)


# --- docs behind the key ----------------------------------------------------------------------


async def test_docs_need_the_key_when_keys_are_set():
    async with client(api_keys=["k"]) as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert openai_error(await c.get(path), 401)["type"] == "authentication_error"
            r = await c.get(path, headers={"Authorization": "Bearer k"})
            assert r.status_code == 200, path
        doc = (await c.get("/openapi.json", headers={"Authorization": "Bearer k"})).json()
        assert "/v1/chat/completions" in doc["paths"]
        evict = doc["paths"]["/admin/evict"]["post"]["responses"]
        assert {"403", "413", "415"} <= set(evict)
    async with client() as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await c.get(path)).status_code == 200


# --- body limit ---------------------------------------------------------------------------


async def test_a_declared_length_over_the_limit_is_413_before_reading():
    async with client(max_body_bytes=1000) as c:
        big = b"x" * 2000
        r = await c.post(
            "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}
        )
        err = openai_error(r, 413)
        assert err["code"] == "request_too_large" and "--max-body-mb" in err["message"]
        r = await c.post("/v1/messages", content=big, headers={"Content-Type": "application/json"})
        assert anthropic_error(r, 413)["type"] == "request_too_large"


async def test_a_chunked_body_is_counted_and_refused_without_reading_it_all():
    pulled = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * 1000

    async with client(max_body_bytes=5000) as c:
        for path, check in (("/v1/completions", openai_error), ("/v1/messages", anthropic_error)):
            pulled = 0
            r = await c.post(path, content=chunks(), headers={"Content-Type": "application/json"})
            assert "limit of 5000 bytes" in check(r, 413)["message"]
            assert pulled < 10  # stopped at the limit, not at the end of the body


async def test_bodies_under_the_limit_pass():
    async with client(max_body_bytes=1000) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": HELLO})
        assert r.status_code == 503  # past every guard: the stub refuses to generate


# --- per-request caps -----------------------------------------------------------------------


CAPS = {"max_request_sequences": 4, "max_request_tokens": 100}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "n": 5, "max_tokens": 1}, "n"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}, "n"),
        ("/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2]] * 5, "max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"messages": HELLO, "n": 2, "max_tokens": 51}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "n": 2, "max_completion_tokens": 51},
            "max_completion_tokens",
        ),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 51}, "max_tokens"),
        ("/v1/responses", {"input": "hi", "max_output_tokens": 101}, "max_output_tokens"),
    ],
)
async def test_caps_are_400s_naming_the_field(path, body, param):
    async with client(**CAPS) as c:
        err = openai_error(await c.post(path, json={"model": "m", **body}), 400)
        assert err["param"] == param and err["type"] == "invalid_request_error"
        assert ("max_request_sequences" if param in ("n", "prompt") else "max_request_tokens") in (
            err["message"]
        )


async def test_messages_cap_is_an_anthropic_error():
    async with client(**CAPS) as c:
        body = {"model": "m", "messages": HELLO, "max_tokens": 101}
        err = anthropic_error(await c.post("/v1/messages", json=body), 400)
        assert "max_tokens" in err["message"] and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "n": 4, "max_tokens": 25}),
        ("/v1/chat/completions", {"messages": HELLO, "n": 4}),  # no max_tokens: no token cap
        ("/v1/completions", {"prompt": ["a", "b"], "n": 2}),  # default max_tokens 16
        ("/v1/responses", {"input": "hi"}),
        ("/v1/messages", {"messages": HELLO, "max_tokens": 100}),
    ],
)
async def test_requests_within_the_caps_pass(path, body):
    async with client(**CAPS) as c:
        r = await c.post(path, json={"model": "m", **body})
        assert r.status_code == 503, r.text
