"""A message that fails typed decoding but names its request is answered, not dropped: its
client gets an error instead of waiting for a reply that never comes (a gateway and worker
of different versions, a bug)."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
import zmq
from test_worker_ingest import generate, received, wired  # noqa: F401 (fixture)

from mlxtg.models import demo_spec
from mlxtg.protocol import (
    ControlReply,
    Error,
    ErrorKind,
    decode,
    request_id_of,
)
from mlxtg.supervisor.config import ServerSettings


def _mistyped(rid: str) -> list[bytes]:
    body = msgpack.unpackb(generate(rid)[1])
    body["params"]["temperature"] = "hot"
    return [b"GENERATE", msgpack.packb(body)]


def test_request_id_of_reads_what_it_can():
    assert request_id_of(_mistyped("r1")) == "r1"
    assert request_id_of([b"GENERATE", b"\xc1 not msgpack"]) is None
    assert request_id_of([b"GENERATE", msgpack.packb([1, 2])]) is None
    assert request_id_of([b"GENERATE"]) is None


def test_the_worker_fails_an_unreadable_generate_that_names_its_request(wired):  # noqa: F811
    io, peer, prep = wired
    peer.send_multipart(_mistyped("nested"))
    got = received(peer, lambda msgs: any(isinstance(m, Error) for m in msgs))
    err = next(m for m in got if isinstance(m, Error))
    assert err.request_id == "nested" and err.kind == ErrorKind.INTERNAL
    assert "could not read this request" in err.message


@pytest.fixture
def supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlxtg.supervisor.core import Supervisor

    monkeypatch.setenv("MLXTG_HOME", str(tmp_path / "home"))
    sup = Supervisor(ServerSettings(models=[demo_spec()], standby_worker=False))
    ctx = zmq.Context()
    gateway = ctx.socket(zmq.DEALER)
    gateway.connect(sup.gateway_endpoint)
    yield sup, gateway
    gateway.close(linger=0)
    ctx.term()
    sup.close()


def _reply(sup, gateway) -> object:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sup.step(timeout_ms=50)
        if gateway.poll(0):
            return decode(gateway.recv_multipart())
    raise AssertionError("no reply")


def test_the_supervisor_answers_unreadable_generate_and_control(supervisor):
    sup, gateway = supervisor
    gateway.send_multipart(_mistyped("g1"))
    err = _reply(sup, gateway)
    assert isinstance(err, Error) and err.request_id == "g1" and err.kind == ErrorKind.INTERNAL
    gateway.send_multipart([b"CONTROL", msgpack.packb({"request_id": "c1", "op": "no-such-op"})])
    reply = _reply(sup, gateway)
    assert isinstance(reply, ControlReply) and reply.request_id == "c1" and not reply.ok
