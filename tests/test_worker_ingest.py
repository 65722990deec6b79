"""The worker's intake: GENERATE is prepared off the I/O thread, so streams keep flowing while
a request is templated and tokenised, and an ABORT still lands on a request in preparation."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from mlxtg.protocol import (
    Abort,
    Accepted,
    Delta,
    Error,
    ErrorKind,
    Generate,
    Heartbeat,
    Output,
    SamplingParams,
    decode,
    encode,
)
from mlxtg.worker.io import WorkerIO
from mlxtg.worker.params import RequestError

# --- WorkerIO with a fake preprocessor --------------------------------------------------------


class SlowPrep:
    """Prepares "slow" requests only once `release` is set; records what it prepared."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.prepared: list[str] = []

    def __call__(self, msg: Generate) -> str:
        if msg.request_id.startswith("slow"):
            self.started.set()
            assert self.release.wait(10)
        if msg.request_id.startswith("bad"):
            raise RequestError("no such thing", param="prompt")
        self.prepared.append(msg.request_id)
        return f"request:{msg.request_id}"

    def tokenize(self, msg: Generate) -> Accepted:
        return Accepted(request_id=msg.request_id, prompt_tokens=3, prompt_token_ids=[1, 2, 3])


@pytest.fixture()
def wired():
    ctx = zmq.Context()
    peer, sock = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    peer.bind("inproc://supervisor")
    sock.connect("inproc://supervisor")
    prep = SlowPrep()
    io = WorkerIO(ctx, sock, "w", prep, lambda: {}, heartbeat_s=0.05)  # type: ignore[arg-type]
    io.start()
    yield io, peer, prep
    prep.release.set()
    io.stop()
    io.join(10)
    ctx.destroy(linger=0)


def generate(rid: str, **kw) -> list[bytes]:
    return encode(Generate(request_id=rid, model="m", params=SamplingParams(), prompt="hi", **kw))


def received(peer: zmq.Socket, until, limit: float = 10.0) -> list:
    """Messages from the worker (heartbeats aside) until `until(messages)` holds."""
    got: list = []
    deadline = time.monotonic() + limit
    while not until(got):
        assert time.monotonic() < deadline, f"only got {got}"
        if peer.poll(100):
            msg = decode(peer.recv_multipart())
            if not isinstance(msg, Heartbeat):
                got.append(msg)
    return got


def inbox(io: WorkerIO, count: int, limit: float = 10.0) -> list:
    items: list = []
    deadline = time.monotonic() + limit
    while len(items) < count:
        assert time.monotonic() < deadline, f"only got {items}"
        items += io.take(block=True)
    return items


def finished(rid: str, reason: str):
    def check(msgs):
        return any(
            isinstance(m, Output)
            and any(d.request_id == rid and d.finish_reason == reason for d in m.deltas)
            for m in msgs
        )

    return check


def test_tokens_leave_while_a_request_is_being_prepared(wired):
    io, peer, prep = wired
    peer.send_multipart(generate("slow"))
    assert prep.started.wait(10)
    # The preprocess thread is stuck in "slow": the engine's output still goes out.
    io.send_all([Output(deltas=[Delta(request_id="running", token_ids=[7], text="x")])])
    got = received(peer, lambda m: any(isinstance(x, Output) for x in m))
    assert got[0].deltas[0].request_id == "running"
    assert prep.prepared == []
    prep.release.set()
    assert inbox(io, 1) == ["request:slow"]


def test_abort_of_a_request_in_preparation_drops_it(wired):
    io, peer, prep = wired
    peer.send_multipart(generate("slow"))
    assert prep.started.wait(10)
    peer.send_multipart(encode(Abort(request_id="slow")))
    # The engine gets the ABORT (it ignores an id it doesn't know) ...
    assert inbox(io, 1) == [Abort(request_id="slow")]
    prep.release.set()
    # ... and the prepared request never reaches it: it ends with an abort delta.
    received(peer, finished("slow", "abort"))
    peer.send_multipart(generate("next"))
    assert inbox(io, 1) == ["request:next"]


def test_abort_of_a_queued_request_skips_its_preparation(wired):
    io, peer, prep = wired
    peer.send_multipart(generate("slow"))
    assert prep.started.wait(10)
    peer.send_multipart(generate("queued"))
    peer.send_multipart(encode(Abort(request_id="queued")))
    assert inbox(io, 1) == [Abort(request_id="queued")]
    prep.release.set()
    received(peer, finished("queued", "abort"))
    assert inbox(io, 1) == ["request:slow"]
    assert prep.prepared == ["slow"]  # "queued" was never prepared


def test_abort_after_hand_over_follows_the_request(wired):
    io, peer, prep = wired
    peer.send_multipart(generate("fast"))
    assert inbox(io, 1) == ["request:fast"]
    peer.send_multipart(encode(Abort(request_id="fast")))
    assert inbox(io, 1) == [Abort(request_id="fast")]  # the engine aborts it


def test_errors_and_tokenize_replies_go_out_through_the_socket(wired):
    io, peer, prep = wired
    peer.send_multipart(generate("bad"))
    peer.send_multipart(generate("tok", tokenize_only=True))
    got = received(peer, finished("tok", "stop"))
    errors = [m for m in got if isinstance(m, Error)]
    assert [(e.request_id, e.kind, e.param) for e in errors] == [
        ("bad", ErrorKind.INVALID_REQUEST, "prompt")
    ]
    accepted = [m for m in got if isinstance(m, Accepted)]
    assert accepted[0].prompt_token_ids == [1, 2, 3]
    assert io.take(block=False) == []  # neither reached the engine


def test_a_malformed_generate_is_dropped_and_the_next_one_prepared(wired):
    io, peer, prep = wired
    peer.send_multipart([b"GENERATE", b"\xc1 not msgpack"])
    peer.send_multipart([b"GENERATE", encode(Abort(request_id="x"))[1]])  # wrong fields
    body = msgpack.unpackb(generate("nested")[1])
    body["params"]["temperature"] = "hot"  # mistyped inside a nested struct
    peer.send_multipart([b"GENERATE", msgpack.packb(body)])
    peer.send_multipart(generate("fine"))
    assert inbox(io, 1) == ["request:fine"]
