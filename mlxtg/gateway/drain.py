"""Graceful shutdown of the gateway (SIGTERM).

Draining: `/ready` answers 503 and new generations get 503 with Retry-After, while the
requests already in flight keep streaming. When the last one finishes, or when
`drain_timeout` runs out, the rest are cut (an error event then `[DONE]` for streams, a 503
for the others, an ABORT to the worker) and the server is told to exit. `cut` counts them:
the process exits 0 only when it is 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fastapi import Request

from .client import SupervisorClient
from .errors import Unavailable

log = logging.getLogger("mlxtg.gateway")

RETRY_AFTER_S = 5.0  # what refused clients are told: about a restart's time


async def refuse_while_draining(request: Request) -> None:
    """Route dependency: new generations (POST) get 503 once the drain has begun; reads of
    stored responses still work."""
    if request.method == "POST":
        request.app.state.drain.refuse_new()


class Drain:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.started_at: float | None = None
        self.cut = 0
        self.on_finished: Callable[[], None] = lambda: None  # the server's exit switch

    @property
    def active(self) -> bool:
        return self.started_at is not None

    def refuse_new(self) -> None:
        """Raise the 503 a request gets while the server shuts down."""
        if self.active:
            raise Unavailable(
                "the server is shutting down; retry on another instance or after its restart",
                code="shutting_down",
                retry_after=RETRY_AFTER_S,
            )

    def begin(self, client: SupervisorClient) -> None:
        """Start draining (on the event loop; the signal handler schedules this)."""
        if self.active:
            return
        self.started_at = time.monotonic()
        log.info(
            "draining: %d request(s) in flight, up to %.0fs", client.generating, self.timeout
        )
        asyncio.get_running_loop().create_task(self._run(client))

    async def _run(self, client: SupervisorClient) -> None:
        assert self.started_at is not None
        deadline = self.started_at + self.timeout
        while client.generating and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if client.generating:
            self.cut = await client.cut_all(
                f"the server shut down before this request finished (drain timeout "
                f"{self.timeout:g}s)"
            )
            log.warning("drain timeout: cut %d request(s)", self.cut)
            await asyncio.sleep(0.2)  # let the handlers write their error events
        else:
            log.info("drained: every request finished")
        self.on_finished()
