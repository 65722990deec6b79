"""Error kinds from workers and the supervisor become each API's status and body in one place
(gateway/errors.py): ERROR messages before a stream starts, and a finish_reason "error"
delta mid-stream, through the real routes (httpx.ASGITransport, a scripted supervisor)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from mlxtg.gateway.app import create_app
from mlxtg.gateway.client import InFlight
from mlxtg.gateway.errors import from_kind
from mlxtg.gateway.settings import GatewaySettings
from mlxtg.protocol import Accepted, Delta, Error, ErrorKind, FinishReason, Generate, Message

HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("kind", "status", "type_", "code"),
    [
        (ErrorKind.INVALID_REQUEST, 400, "invalid_request_error", None),
        (ErrorKind.CONTEXT_OVERFLOW, 400, "invalid_request_error", "context_length_exceeded"),
        (ErrorKind.MODEL_NOT_FOUND, 404, "invalid_request_error", "model_not_found"),
        (ErrorKind.QUEUE_FULL, 429, "rate_limit_error", "queue_full"),
        (ErrorKind.UNAVAILABLE, 503, "server_error", None),
        (ErrorKind.GENERATION_FAILED, 500, "server_error", None),
        (ErrorKind.INTERNAL, 500, "server_error", None),
    ],
)
def test_every_kind_has_one_status_type_and_default_code(kind, status, type_, code):
    exc = from_kind(kind, "why", param="p")
    assert (exc.status, exc.type, exc.code, exc.param) == (status, type_, code, "p")
    assert from_kind(kind, "why", code="own").code == "own"  # a sender's code wins


def test_the_table_covers_every_kind():
    assert {from_kind(k, "x").status for k in ErrorKind} <= {400, 404, 429, 500, 503}
    assert all(type(from_kind(k, "x")).__name__ != "APIError" for k in ErrorKind)


class ScriptedSupervisor:
    """Answers every GENERATE with `script(gen)`, as the supervisor's socket would."""

    def __init__(self, script: Any):
        self.script = script

    async def control(self, op: str, args: Any = None, timeout: float = 5.0) -> Any:
        model = {"name": "m", "state": "loaded", "context_length": 64}
        return SimpleNamespace(ok=True, data={"models": [model]}, error=None)

    @contextlib.asynccontextmanager
    async def generate(
        self, gen: Generate, queue: asyncio.Queue[Message] | None = None
    ) -> AsyncIterator[InFlight]:
        handle = InFlight(gen.request_id, queue)
        for msg in self.script(gen):
            handle.queue.put_nowait(msg)
        yield handle


def client(script: Any) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(supervisor_endpoint="ipc:///tmp/none"))
    app.state.client = ScriptedSupervisor(script)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:5001"
    )


def refused(kind: ErrorKind, **fields: Any) -> Any:
    return lambda gen: [Error(request_id=gen.request_id, kind=kind, message="no", **fields)]


def fails_mid_stream(gen: Generate) -> list[Message]:
    rid = gen.request_id
    return [
        Accepted(request_id=rid, prompt_tokens=3),
        Delta(request_id=rid, text="{", token_ids=[7]),
        Delta(
            request_id=rid,
            finish_reason=FinishReason.ERROR,
            completion_tokens=2,
            error_kind=ErrorKind.GENERATION_FAILED,
            error_message="generation failed: token 9 violates the json constraint: oops",
        ),
    ]


@pytest.mark.parametrize(
    ("kind", "fields", "status", "code", "retry_after"),
    [
        (ErrorKind.QUEUE_FULL, {"retry_after": 2.0}, 429, "queue_full", "2"),
        (ErrorKind.MODEL_NOT_FOUND, {"param": "model"}, 404, "model_not_found", None),
        (
            ErrorKind.UNAVAILABLE,
            {"code": "worker_died", "retry_after": 1.0},
            503,
            "worker_died",
            "1",
        ),
        (ErrorKind.CONTEXT_OVERFLOW, {}, 400, "context_length_exceeded", None),
    ],
)
async def test_error_messages_become_openai_errors(kind, fields, status, code, retry_after):
    async with client(refused(kind, **fields)) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": HELLO})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"] == "no"
    assert r.headers.get("retry-after") == retry_after


async def test_an_error_message_on_the_anthropic_route_keeps_its_shape():
    async with client(refused(ErrorKind.QUEUE_FULL, retry_after=3.0)) as c:
        r = await c.post("/v1/messages", json={"model": "m", "max_tokens": 8, "messages": HELLO})
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": "no"}}


async def test_a_mid_stream_failure_says_what_failed():
    async with client(fails_mid_stream) as c:
        body = {"model": "m", "messages": HELLO, "stream": True}
        r = await c.post("/v1/chat/completions", json=body)
        plain = await c.post("/v1/chat/completions", json={"model": "m", "messages": HELLO})
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "violates the json constraint: oops" in error["message"]
    assert error["type"] == "server_error"
    assert plain.status_code == 500
    assert "violates the json constraint" in plain.json()["error"]["message"]


async def test_a_mid_stream_failure_on_the_anthropic_route():
    async with client(fails_mid_stream) as c:
        body = {"model": "m", "max_tokens": 8, "messages": HELLO, "stream": True}
        r = await c.post("/v1/messages", json=body)
    data = [
        json.loads(x.removeprefix("data: ")) for x in r.text.splitlines() if x.startswith("data")
    ]
    assert data[-1]["type"] == "error"
    assert "violates the json constraint: oops" in data[-1]["error"]["message"]
