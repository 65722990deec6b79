"""Where each request's messages go: plain state, no sockets.

A dispatched request has a route (its gateway, its worker, the choices still running); a
request whose model is not ready waits in that model's queue until it is, or until its
deadline. Everything a worker sends back is keyed by request id, and the router says which
gateway gets it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..protocol import Delta, Generate


@dataclass(slots=True)
class Route:
    """A request a worker is serving."""

    gateway: bytes
    worker_id: str
    choices_left: int


@dataclass(slots=True)
class Waiting:
    """A request waiting for its model to become ready."""

    gateway: bytes
    msg: Generate
    since: float  # monotonic


class Router:
    """Owns the routes of dispatched requests (and so which workers are busy) and the
    queues of requests waiting for a model."""

    def __init__(self, max_queued: int):
        self.max_queued = max_queued
        self.routes: dict[str, Route] = {}
        self.pending: dict[str, deque[Waiting]] = {}  # by model name
        self._by_worker: dict[str, set[str]] = {}

    # --- dispatched requests -------------------------------------------------------------------

    def add(self, gateway: bytes, worker_id: str, msg: Generate) -> None:
        self.routes[msg.request_id] = Route(gateway, worker_id, msg.n)
        self._by_worker.setdefault(worker_id, set()).add(msg.request_id)

    def get(self, request_id: str) -> Route | None:
        return self.routes.get(request_id)

    def finish(self, request_id: str) -> Route | None:
        route = self.routes.pop(request_id, None)
        if route is not None:
            ids = self._by_worker.get(route.worker_id)
            if ids is not None:
                ids.discard(request_id)
                if not ids:
                    del self._by_worker[route.worker_id]
        return route

    def inflight(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def drop_worker(self, worker_id: str) -> list[tuple[str, Route]]:
        """Forget every route of a worker that is gone; the caller fails them."""
        ids = self._by_worker.pop(worker_id, set())
        return [(rid, route) for rid in sorted(ids) if (route := self.routes.pop(rid, None))]

    def split(self, deltas: list[Delta]) -> tuple[dict[bytes, list[Delta]], list[str]]:
        """One worker OUTPUT: the deltas per gateway, and the requests it finished (all
        their choices done, or aborted). Deltas of unknown requests are dropped."""
        per_gateway: dict[bytes, list[Delta]] = {}
        finished = []
        for delta in deltas:
            route = self.routes.get(delta.request_id)
            if route is None:
                continue
            per_gateway.setdefault(route.gateway, []).append(delta)
            if delta.finish_reason is not None:
                route.choices_left -= 1
                if route.choices_left <= 0 or delta.finish_reason == "abort":
                    finished.append(delta.request_id)
        return per_gateway, finished

    # --- waiting requests ----------------------------------------------------------------------

    def enqueue(self, model: str, gateway: bytes, msg: Generate, now: float) -> bool:
        """Queue a request for a model that is not ready; False when the queue is full."""
        queue = self.pending.setdefault(model, deque())
        if len(queue) >= self.max_queued:
            return False
        queue.append(Waiting(gateway, msg, now))
        return True

    def take(self, model: str) -> list[Waiting]:
        """Every request waiting for `model`, oldest first (it is ready, or failed)."""
        return list(self.pending.pop(model, ()))

    def cancel(self, request_id: str) -> bool:
        """Remove a waiting request (aborted before dispatch)."""
        for queue in self.pending.values():
            for item in queue:
                if item.msg.request_id == request_id:
                    queue.remove(item)
                    return True
        return False

    def expired(self, now: float, timeout: float) -> list[tuple[str, Waiting]]:
        """Remove and return the requests that waited longer than `timeout`."""
        out = []
        for model, queue in self.pending.items():
            while queue and now - queue[0].since > timeout:
                out.append((model, queue.popleft()))
        return out

    def waiting_models(self) -> tuple[str, ...]:
        return tuple(model for model, queue in self.pending.items() if queue)

    def waiting(self, model: str) -> int:
        return len(self.pending.get(model, ()))
