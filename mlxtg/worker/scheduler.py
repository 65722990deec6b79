"""Which work runs in the next engine step. Plain Python: no tensors, no MLX.

A step decodes one token for every running sequence and, within a token budget, prefills
chunks of waiting requests. Chunking means a long prompt arriving never stalls running
streams for more than one chunk. Requests start prefill in arrival order, and only when
their `n` choices will fit in the decode batch (`max_batch`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Request:
    """A validated, tokenised request waiting for (or in) prefill."""

    request_id: str
    prompt: list[int]
    n: int = 1
    num_computed: int = 0  # prompt tokens already in its KV cache (a cached prefix counts)
    cache: Any = None  # the engine's per-request KV cache while prefilling
    payload: Any = None  # everything else the engine needs (params, guide, parser...)

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.num_computed


@dataclass(slots=True)
class PrefillChunk:
    request: Request
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.request.prompt)


@dataclass(slots=True)
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: bool = False

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class QueueFull(Exception):
    """Raised by `add` when `max_queued` requests already wait."""


class Scheduler:
    """Admission, ordering and per-step budgets for one worker."""

    def __init__(self, max_batch: int = 32, max_queued: int = 128, chunk_tokens: int = 512):
        if max_batch < 1 or max_queued < 1 or chunk_tokens < 1:
            raise ValueError("max_batch, max_queued and chunk_tokens must be positive")
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Request] = deque()
        self.num_running = 0  # sequences in the decode batch, kept by the engine loop

    def can_add(self) -> bool:
        return len(self.waiting) < self.max_queued

    def add(self, request: Request) -> None:
        if not self.can_add():
            raise QueueFull(f"{len(self.waiting)} requests already queued")
        self.waiting.append(request)

    def remove(self, request_id: str) -> Request | None:
        """Drop a request that has not started decoding (abort). Idempotent."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return req
        return None

    def schedule(self) -> StepPlan:
        """Plan one step: decode everything running, prefill what fits the budgets."""
        plan = StepPlan(decode=self.num_running > 0)
        budget = self.chunk_tokens
        free = self.max_batch - self.num_running
        for req in self.waiting:
            if budget <= 0:
                break
            # A request bigger than the whole batch still runs, alone.
            if req.n > free and (free < self.max_batch or plan.prefill):
                break
            take = min(req.remaining, budget)
            plan.prefill.append(PrefillChunk(req, req.num_computed, req.num_computed + take))
            budget -= take
            free -= req.n
        return plan

    def complete(self, chunk: PrefillChunk) -> None:
        """Record a finished chunk; a request whose prompt is done leaves the queue."""
        chunk.request.num_computed = chunk.end
        if chunk.is_last:
            self.waiting.remove(chunk.request)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.num_running == 0
