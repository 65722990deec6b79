"""The worker's I/O thread: owns the ZeroMQ socket to the supervisor.

It routes incoming messages and serialises outgoing ones; nothing slow runs on it, so a
step's tokens leave as soon as the engine hands them over. GENERATE (decode, template,
tokenise, validate, compile constraints) goes to a preprocess thread of its own, which
queues the request for the engine or hands its reply back through the outbox: the socket
is used by the I/O thread only (ZeroMQ sockets are not thread-safe). The other threads
talk to it through queues and inproc wake-up sockets, one per sending thread.

An ABORT may overtake its GENERATE while that is still being preprocessed. It always goes
to the engine (which ignores ids it doesn't know), and it is also noted for the preprocess
thread, which then drops the request and ends it with an abort delta instead of queuing
it: under one lock with the preprocess thread's hand-over, so exactly one of the two
sees the request.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from ..protocol import (
    Abort,
    Control,
    ControlOp,
    Delta,
    Error,
    ErrorKind,
    FinishReason,
    Generate,
    Heartbeat,
    Message,
    MsgType,
    Output,
    ProtocolError,
    decode,
    encode,
    request_id_of,
)
from .params import RequestError

if TYPE_CHECKING:
    from .preprocess import Preprocessor

log = logging.getLogger("mlxtg.worker")


_GENERATE = MsgType.GENERATE.value.encode("ascii")


class Shutdown:
    """Inbox item: stop the engine loop."""


class WorkerIO(threading.Thread):
    def __init__(
        self,
        ctx: zmq.Context,
        sock: zmq.Socket,
        worker_id: str,
        preprocess: Preprocessor,
        stats: Callable[[], dict[str, Any]],
        heartbeat_s: float = 1.0,
    ):
        super().__init__(name="worker-io", daemon=True)
        self._sock = sock
        self._worker_id = worker_id
        self._preprocess = preprocess
        self._stats = stats
        self._heartbeat_s = heartbeat_s
        self.inbox: queue.Queue[Any] = queue.Queue()
        self._outbox: queue.Queue[Message] = queue.Queue()
        addr = f"inproc://wake-{id(self)}"
        self._wake_pull = ctx.socket(zmq.PULL)
        self._wake_pull.bind(addr)
        self._wake_push = ctx.socket(zmq.PUSH)  # used by the engine thread only
        self._wake_push.connect(addr)
        self._wake_prep = ctx.socket(zmq.PUSH)  # used by the preprocess thread only
        self._wake_prep.connect(addr)
        # GENERATE frames, numbered in arrival order, for the preprocess thread.
        self._jobs: queue.Queue[tuple[int, list[bytes]] | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the three fields below
        self._received = 0  # GENERATEs handed to the preprocess thread
        self._prepared = 0  # of those, the ones it has finished
        # request id -> `_received` when its ABORT came: a GENERATE numbered up to that
        # may still be in preparation. Dropped once `_prepared` reaches it.
        self._aborts: dict[str, int] = {}
        self._preparer = threading.Thread(target=self._prepare, name="worker-prep", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._preparer.start()
        super().start()

    def stop(self) -> None:
        """End both threads (within a heartbeat interval); the sockets stay open."""
        self._stopping.set()
        self._jobs.put(None)

    # --- called from the engine thread -------------------------------------------------------

    def send(self, msg: Message) -> None:
        self.send_all([msg])

    def send_all(self, msgs: list[Message]) -> None:
        for msg in msgs:
            self._outbox.put(msg)
        _wake(self._wake_push)

    def take(self, block: bool) -> list[Any]:
        """Everything in the inbox; waits for the first item only when `block`."""
        items: list[Any] = []
        if block:
            try:
                items.append(self.inbox.get(timeout=0.5))
            except queue.Empty:
                return items
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    # --- the thread --------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        # A first heartbeat right away: status shows the worker's stats as soon as it is ready.
        self._send_now(Heartbeat(worker_id=self._worker_id, stats=self._stats()))
        next_beat = time.monotonic() + self._heartbeat_s
        while not self._stopping.is_set():
            events = dict(poller.poll(timeout=int(self._heartbeat_s * 1000)))
            if self._wake_pull in events:
                while self._wake_pull.poll(0):
                    self._wake_pull.recv()
                self._flush()
            if self._sock in events:
                while self._sock.poll(0):
                    self._receive(self._sock.recv_multipart())
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self._heartbeat_s
                self._send_now(Heartbeat(worker_id=self._worker_id, stats=self._stats()))

    def _flush(self) -> None:
        while True:
            try:
                msg = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send_now(msg)

    def _send_now(self, msg: Message) -> None:
        self._sock.send_multipart(encode(msg))

    def _receive(self, frames: list[bytes]) -> None:
        if frames and frames[0] == _GENERATE:  # even decoding a big body waits elsewhere
            with self._lock:
                self._received += 1
                self._jobs.put((self._received, frames))
            return
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.error("dropping malformed message: %s", exc)
            return
        if isinstance(msg, Abort):
            with self._lock:
                if self._prepared < self._received:
                    self._aborts[msg.request_id] = self._received
                self.inbox.put(msg)
        elif isinstance(msg, Control) and msg.op == ControlOp.SHUTDOWN:
            self.inbox.put(Shutdown())
        elif isinstance(msg, Control) and msg.op == ControlOp.CACHE_CLEAR:
            self.inbox.put(msg)
        else:
            log.warning("worker ignores %s", type(msg).__name__)

    # --- the preprocess thread ----------------------------------------------------------------

    def _prepare(self) -> None:
        """The preprocess thread: GENERATEs in arrival order, one at a time."""
        while (job := self._jobs.get()) is not None:
            number, frames = job
            try:
                msg = decode(frames)
            except Exception as exc:  # whatever the bytes, this thread must go on
                log.error("malformed GENERATE: %s", exc)
                rid = request_id_of(frames)
                # Fail the request it names (its client would otherwise wait forever).
                failed: list[Message] = [_unreadable(rid, exc)] if rid is not None else []
                self._hand_over(number, rid, None, failed)
                continue
            if not isinstance(msg, Generate):
                self._hand_over(number, None, None, [])
                continue
            with self._lock:
                aborted = msg.request_id in self._aborts
            if aborted:  # aborted while it waited here: not even prepared
                self._hand_over(number, msg.request_id, None, [])
            else:
                self._hand_over(number, msg.request_id, *self._prepare_one(msg))

    def _prepare_one(self, msg: Generate) -> tuple[Any, list[Message]]:
        """A request for the engine, or the replies that answer it here."""
        rid = msg.request_id
        try:
            if msg.tokenize_only:
                # Nothing reaches the engine. The final delta closes the request's route in
                # the supervisor like any finished generation.
                done = Delta(request_id=rid, finish_reason=FinishReason.STOP)
                return None, [self._preprocess.tokenize(msg), Output(deltas=[done])]
            return self._preprocess(msg), []
        except RequestError as exc:
            return None, [_error(rid, exc)]
        except Exception as exc:  # a bug must fail one request, never the worker
            log.exception("preprocessing %s failed", rid)
            return None, [
                Error(
                    request_id=rid,
                    kind=ErrorKind.INTERNAL,
                    message=f"internal error while preparing the request: {exc}",
                )
            ]

    def _hand_over(
        self, number: int, rid: str | None, request: Any, replies: list[Message]
    ) -> None:
        """Queue a prepared request for the engine, or send its replies; an aborted one
        ends with an abort delta instead, whatever its preparation gave."""
        with self._lock:
            if rid is not None and rid in self._aborts:
                request = None
                replies = [Output(deltas=[Delta(request_id=rid, finish_reason=FinishReason.ABORT)])]
            elif request is not None:
                self.inbox.put(request)
            self._prepared = number
            self._aborts = {r: n for r, n in self._aborts.items() if n > number}
        if replies:
            for msg in replies:
                self._outbox.put(msg)
            _wake(self._wake_prep)


def _wake(push: zmq.Socket) -> None:
    """Wake the I/O thread to flush the outbox (a wake-up still pending will do as well)."""
    with contextlib.suppress(zmq.Again):
        push.send(b"", zmq.NOBLOCK)


def _unreadable(request_id: str, exc: Exception) -> Error:
    return Error(
        request_id=request_id,
        kind=ErrorKind.INTERNAL,
        message=f"the worker could not read this request (a version mismatch?): {exc}",
    )


def _error(request_id: str, exc: RequestError) -> Error:
    return Error(
        request_id=request_id,
        kind=exc.kind,
        message=exc.message,
        param=exc.param,
        code=exc.code,
        retry_after=exc.retry_after,
    )
