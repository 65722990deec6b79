"""The worker's I/O thread: owns the ZeroMQ socket to the supervisor.

It decodes incoming messages, preprocesses GENERATE (template, tokenise, validate,
compile constraints) so that work overlaps the forward pass, and serialises outgoing
messages. The MLX thread talks to it through two queues and an inproc wake-up socket.
"""

from __future__ import annotations

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
    FinishReason,
    Generate,
    Heartbeat,
    Message,
    Output,
    ProtocolError,
    decode,
    encode,
)
from .params import RequestError

if TYPE_CHECKING:
    from .preprocess import Preprocessor

log = logging.getLogger("mlxtg.worker")


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

    # --- called from the engine thread -------------------------------------------------------

    def send(self, msg: Message) -> None:
        self.send_all([msg])

    def send_all(self, msgs: list[Message]) -> None:
        for msg in msgs:
            self._outbox.put(msg)
        self._wake_push.send(b"", zmq.NOBLOCK)

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
        while True:
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
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            log.error("dropping malformed message: %s", exc)
            return
        if isinstance(msg, Generate):
            try:
                if msg.tokenize_only:
                    self._tokenize(msg)
                else:
                    self.inbox.put(self._preprocess(msg))
            except RequestError as exc:
                self._send_now(_error(msg.request_id, exc))
            except Exception as exc:  # a bug must fail one request, never the worker
                log.exception("preprocessing %s failed", msg.request_id)
                self._send_now(
                    Error(
                        request_id=msg.request_id,
                        status=500,
                        message=f"internal error while preparing the request: {exc}",
                        type="server_error",
                    )
                )
        elif isinstance(msg, Abort):
            self.inbox.put(msg)
        elif isinstance(msg, Control) and msg.op == ControlOp.SHUTDOWN:
            self.inbox.put(Shutdown())
        elif isinstance(msg, Control) and msg.op == ControlOp.CACHE_CLEAR:
            self.inbox.put(msg)
        else:
            log.warning("worker ignores %s", type(msg).__name__)

    def _tokenize(self, msg: Generate) -> None:
        # Answered here, on the I/O thread: nothing reaches the engine. The final delta
        # closes the request's route in the supervisor like any finished generation.
        self._send_now(self._preprocess.tokenize(msg))
        done = Delta(request_id=msg.request_id, finish_reason=FinishReason.STOP)
        self._send_now(Output(deltas=[done]))


def _error(request_id: str, exc: RequestError) -> Error:
    return Error(
        request_id=request_id,
        status=exc.status,
        message=exc.message,
        type=exc.type,
        param=exc.param,
        code=exc.code,
        retry_after=exc.retry_after,
    )
