"""The gateway's async connection to the supervisor.

One DEALER socket; a reader task decodes every incoming message and hands it to the
queue of the request it belongs to. Requests never share state, so one failing request
cannot disturb another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from ..protocol import (
    Abort,
    Accepted,
    Control,
    ControlOp,
    ControlReply,
    Error,
    ErrorKind,
    Generate,
    Message,
    Output,
    ProtocolError,
    decode,
    encode,
)
from .errors import BadRequest, Unavailable

log = logging.getLogger("mlxtg.gateway")

_CONTROL_PREFIX = "ctl-"  # request ids of control messages share the queue table


class InFlight:
    """One request's incoming messages; `done` once it ended (no ABORT needed)."""

    __slots__ = ("request_id", "queue", "done")

    def __init__(self, request_id: str, queue: asyncio.Queue[Message] | None = None):
        self.request_id = request_id
        self.queue: asyncio.Queue[Message] = queue if queue is not None else asyncio.Queue()
        self.done = False


class SupervisorClient:
    def __init__(self, endpoint: str):
        self._endpoint = endpoint
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._queues: dict[str, asyncio.Queue[Message]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self._endpoint)
        self._reader = asyncio.create_task(self._read_loop())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close()
        self._ctx.term()

    @property
    def generating(self) -> int:
        """Generation requests in flight (control requests excluded)."""
        return sum(1 for rid in self._queues if not rid.startswith(_CONTROL_PREFIX))

    async def cut_all(self, message: str) -> int:
        """End every generation in flight: ABORT it in the worker and hand its handler an
        error (streams send an error event, then [DONE]). Returns how many were cut."""
        cut = [rid for rid in self._queues if not rid.startswith(_CONTROL_PREFIX)]
        for rid in cut:
            with contextlib.suppress(Exception):
                await self._send(Abort(request_id=rid))
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(
                    Error(
                        request_id=rid,
                        kind=ErrorKind.UNAVAILABLE,
                        message=message,
                        code="shutting_down",
                        retry_after=5.0,
                    )
                )
        return len(cut)

    async def _read_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                msg = decode(frames)
            except ProtocolError as exc:
                log.error("malformed message from supervisor: %s", exc)
                continue
            if isinstance(msg, Output):
                for delta in msg.deltas:
                    q = self._queues.get(delta.request_id)
                    if q is not None:
                        q.put_nowait(delta)
            elif isinstance(msg, Accepted | Error | ControlReply):
                q = self._queues.get(msg.request_id)
                if q is not None:
                    q.put_nowait(msg)

    async def _send(self, msg: Message) -> None:
        if self._sock is None:
            raise Unavailable("not connected to the supervisor")
        try:
            frames = encode(msg)
        except (OverflowError, UnicodeEncodeError, ValueError) as exc:
            # Anything a client can put where the schema does not look (unknown keys in a
            # message or a tool schema): a number msgpack cannot hold, a lone surrogate.
            raise BadRequest(
                "the request holds a number outside the 64-bit range or text that is not "
                f"valid Unicode ({type(exc).__name__})"
            ) from None
        await self._sock.send_multipart(frames)

    @contextlib.asynccontextmanager
    async def generate(
        self, msg: Generate, queue: asyncio.Queue[Message] | None = None
    ) -> AsyncIterator[InFlight]:
        """Send a request and yield its handle (several requests may share one queue).
        Leaving the block before the request finished (client gone, error) sends an
        ABORT; ABORT is idempotent."""
        handle = InFlight(msg.request_id, queue)
        self._queues[msg.request_id] = handle.queue
        try:
            await self._send(msg)
            yield handle
        finally:
            self._queues.pop(msg.request_id, None)
            if not handle.done:
                with contextlib.suppress(Exception):
                    await self._send(Abort(request_id=msg.request_id))

    async def control(
        self, op: ControlOp, args: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> ControlReply:
        rid = f"{_CONTROL_PREFIX}{uuid.uuid4().hex}"
        q: asyncio.Queue[Message] = asyncio.Queue()
        self._queues[rid] = q
        try:
            await self._send(Control(request_id=rid, op=op, args=args or {}))
            reply = await asyncio.wait_for(q.get(), timeout)
        except TimeoutError:
            raise Unavailable("the supervisor did not answer", retry_after=1.0) from None
        finally:
            self._queues.pop(rid, None)
        assert isinstance(reply, ControlReply)
        return reply
