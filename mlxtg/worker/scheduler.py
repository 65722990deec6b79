"""Which work runs in the next engine step. Plain Python: no tensors, no MLX.

The scheduler owns both queues of a worker: `waiting` requests (tokenised, not yet fully
prefilled) and `running` sequences (the decode batch, in the model runner's row order).

A step decodes one token for every running sequence and, within a token budget, prefills
waiting prompts. Prompts whose rest fits the budget are finished together as one batch
(the budget counts the padded batch: rows x longest rest); a prompt too long for the
budget gets one chunk of its own per step, so a long prompt arriving never stalls running
streams for more than one chunk.

Admission is fair: a request starts when its `n` choices fit in the decode batch
(`max_batch`), but one that does not fit never blocks later ones that do, and the request
asking for the least decode work (choices not started x max_tokens) goes first, so a short
request is not stuck behind a giant one. No request starves: one that later arrivals have
overtaken `max_overtakes` times holds the line (nothing else starts until it has), and a
prompt whose prefill has begun is finished first.

Choices are the unit of admission, not requests. A request that can never fit (n >
max_batch) or that holds the line starts in slices: as many choices as there are free rows.
Its prompt is prefilled once; the rest of its choices wait, with nothing left to prefill,
and compete for rows as they free up like any other waiting work, so one request with a
huge `n` cannot hold every row until all of its choices are done. Running sequences are
never preempted: a short request waits at most until one row frees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, eq=False)  # identity: queues remove this very request
class Request:
    """A validated, tokenised request waiting for (or in) prefill."""

    request_id: str
    prompt: list[int]
    n: int = 1
    max_tokens: int = 1  # per choice: with `n`, the decode work it asks for
    num_computed: int = 0  # prompt tokens already in its KV cache (a cached prefix counts)
    chunked: bool = False  # a chunk of its prompt was prefilled: it is finished first
    overtaken: int = 0  # later arrivals that started before it
    cache: Any = None  # its own batch-1 KV cache while prefilling
    payload: Any = None  # everything else the engine needs (params, guide, parser...)
    prompt_scores: list[Any] = field(default_factory=list)  # scored chunks so far (echo)
    # A prefill chunk ends exactly here (0: none), so the engine can checkpoint an
    # untrimmable cache at it (a reasoning template's tail, which the next turn drops).
    boundary: int = 0
    started: int = 0  # choices in the decode batch (or done); > 0: the prompt is prefilled
    first_logits: Any = None  # (1, V) next-token logits kept for choices not yet started
    source: Any = None  # the GENERATE it was prepared from (a distributed rank 0 shares it)

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.num_computed

    @property
    def pending(self) -> int:
        """Choices not started yet."""
        return self.n - self.started

    @property
    def work(self) -> int:
        return self.pending * self.max_tokens


@dataclass(slots=True)
class PrefillChunk:
    request: Request
    start: int
    end: int
    choices: int = 0  # choices to start when this chunk ends the prompt (0: all of them)

    @property
    def is_last(self) -> bool:
        return self.end == len(self.request.prompt)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class Slice:
    """More choices of a request whose prompt is already prefilled."""

    request: Request
    choices: int


@dataclass(slots=True)
class StepPlan:
    decode: bool = False
    partial: PrefillChunk | None = None  # a non-final chunk of a long prompt, run alone
    final: list[PrefillChunk] = field(default_factory=list)  # prompts that finish this step
    slices: list[Slice] = field(default_factory=list)  # prefilled requests' next choices

    @property
    def prefill(self) -> list[PrefillChunk]:
        return ([self.partial] if self.partial else []) + self.final

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill and not self.slices


class QueueFull(Exception):
    """Raised by `add` when `max_queued` requests already wait."""


class Scheduler:
    """Admission, ordering and per-step budgets for one worker; owner of both queues."""

    def __init__(
        self,
        max_batch: int = 32,
        max_queued: int = 128,
        chunk_tokens: int = 512,
        idle_chunk_tokens: int | None = None,
        padded: bool = True,
        max_overtakes: int | None = None,
    ):
        if max_batch < 1 or max_queued < 1 or chunk_tokens < 1:
            raise ValueError("max_batch, max_queued and chunk_tokens must be positive")
        self.max_batch = max_batch
        # How many later arrivals may start before a waiting request (default: a batch's
        # worth); then it holds the line until the rows it needs are free.
        self.max_overtakes = max_batch if max_overtakes is None else max_overtakes
        self.max_queued = max_queued
        self.chunk_tokens = chunk_tokens
        # With nothing running there are no streams to stall: prompts that arrived together
        # may use a bigger budget and start together (see `budget`).
        self.idle_chunk_tokens = max(chunk_tokens, idle_chunk_tokens or chunk_tokens)
        self.padded = padded  # final chunks run as one padded batch (cost: rows x longest)
        self.waiting: deque[Request] = deque()
        self.running: list[Any] = []  # Sequence objects, row i of the decode batch

    # --- waiting ---------------------------------------------------------------------------

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

    # --- running ---------------------------------------------------------------------------

    def join(self, seqs: list[Any]) -> None:
        """Sequences whose prompt is done enter the decode batch (appended rows)."""
        self.running.extend(seqs)

    def keep(self, keep: Callable[[Any], bool]) -> list[int]:
        """Keep the running sequences `keep` accepts; returns the kept row indices."""
        rows = [i for i, s in enumerate(self.running) if keep(s)]
        self.running = [self.running[i] for i in rows]
        return rows

    @property
    def num_running(self) -> int:
        return len(self.running)

    # --- planning --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan one step: decode everything running, prefill what fits the budgets."""
        plan = StepPlan(decode=bool(self.running))
        budget = self.budget()
        free = self.max_batch - len(self.running)
        longest = 0
        for req in self.order():
            if req.started:  # prefilled: its next choices need rows, no prompt tokens
                if free:
                    plan.slices.append(Slice(req, min(free, req.pending)))
                    free -= plan.slices[-1].choices
                    continue
                if self.holds_line(req):
                    break
                continue
            if req.num_computed < req.boundary:  # a chunk of its own that ends there
                if not plan.final:
                    end = min(req.boundary, req.num_computed + budget)
                    plan.partial = PrefillChunk(req, req.num_computed, end)
                break
            if req.n > free and not (free and self.sliced(req)):
                if self.holds_line(req):
                    break  # the rows that free up are its own
                continue  # later, smaller requests may take the free rows
            rows = len(plan.final) + 1
            rest = max(longest, req.remaining) if self.padded else req.remaining
            cost = rows * rest if self.padded else sum(c.size for c in plan.final) + rest
            if cost <= budget:
                take = min(req.n, free)
                plan.final.append(PrefillChunk(req, req.num_computed, len(req.prompt), take))
                longest, free = rest, free - take
                continue
            if not plan.final:  # too long for one step: a chunk of its own
                end = req.num_computed + budget
                plan.partial = PrefillChunk(req, req.num_computed, end)
            break
        self._count_overtakes({id(c.request) for c in plan.prefill + plan.slices})
        return plan

    def sliced(self, req: Request) -> bool:
        """Whether `req` may start with fewer rows than its `n`: it can never fit, or it
        has waited long enough that the rows that free up are its own."""
        return req.n > self.max_batch or self.holds_line(req)

    def order(self) -> list[Request]:
        """Waiting requests in the order they may start: prompts already being prefilled,
        then those that hold the line (in arrival order), then the least work first."""

        def rank(req: Request) -> tuple[int, int]:
            if req.chunked:
                return (0, 0)
            if self.holds_line(req):
                return (1, 0)
            return (2, req.work)

        return sorted(self.waiting, key=rank)  # stable: arrival order among equals

    def holds_line(self, req: Request) -> bool:
        return req.overtaken >= self.max_overtakes

    def _count_overtakes(self, started: set[int]) -> None:
        later = 0  # requests that arrived after this one and start now
        for req in reversed(self.waiting):
            if id(req) in started:
                later += 1
            else:
                req.overtaken += later

    def budget(self) -> int:
        """Prompt tokens (padded) this step may prefill. Stalling running streams costs
        each of them one long step, so the budget grows with how many requests wait per
        running stream: a burst of arrivals behind one early starter prefills together,
        while one long prompt still goes in `chunk_tokens` pieces."""
        if not self.running:
            return self.idle_chunk_tokens
        per_stream = len(self.waiting) // len(self.running)
        return min(self.idle_chunk_tokens, self.chunk_tokens * max(1, per_stream))

    def complete(self, chunk: PrefillChunk) -> None:
        """Record a finished chunk; a request whose prompt is done starts its choices."""
        chunk.request.num_computed = chunk.end
        chunk.request.chunked = not chunk.is_last
        if chunk.is_last:
            self.start(chunk.request, chunk.choices or chunk.request.pending)

    def start(self, request: Request, choices: int) -> None:
        """`choices` more of the request's choices entered the decode batch; once all have,
        it leaves the queue. Its overtake count restarts: it has just had its turn."""
        request.started += choices
        request.overtaken = 0
        if request.pending <= 0 and request in self.waiting:
            self.waiting.remove(request)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
