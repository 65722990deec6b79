"""One HTTP request's generation: one GENERATE per prompt, merged into one event stream.

Choice indices are global: prompt p's choice i is `p * n + i` (OpenAI's order for a
list of prompts). `accept()` waits for every prompt to be accepted (so validation errors
become proper HTTP errors before any byte of a stream is sent); `events()` yields deltas
until every choice finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..protocol import Accepted, Delta, Error, ErrorKind, FinishReason, Generate, Message
from .client import InFlight, SupervisorClient
from .errors import APIError, from_error, from_kind


@dataclass(slots=True)
class PromptFacts:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_source: str = "none"
    cache_miss_reason: str | None = None


class Run:
    def __init__(self, client: SupervisorClient, gens: list[Generate], n: int):
        self._client = client
        self._gens = gens
        self.n = n
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._stack = contextlib.AsyncExitStack()
        self._handles: dict[str, InFlight] = {}
        self._prompt_index = {g.request_id: p for p, g in enumerate(gens)}
        self._buffer: list[Message] = []
        self._left = len(gens) * n
        self._finished = [0] * len(gens)  # finished choices per prompt
        self._accepted: set[str] = set()
        self._replies: dict[str, Accepted] = {}
        self.facts: list[PromptFacts] = [PromptFacts() for _ in gens]
        self.created = int(time.time())
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None

    async def __aenter__(self) -> Run:
        await self._stack.__aenter__()
        for gen in self._gens:
            handle = await self._stack.enter_async_context(self._client.generate(gen, self._queue))
            self._handles[gen.request_id] = handle
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.__aexit__(*exc)

    @property
    def model(self) -> str:
        """The model's name as the request gave it (the supervisor matches names exactly)."""
        return self._gens[0].model

    @property
    def prompt_tokens(self) -> int:
        return sum(f.prompt_tokens for f in self.facts)

    @property
    def cached_tokens(self) -> int:
        return sum(f.cached_tokens for f in self.facts)

    async def accept(self, timeout: float | None = None) -> bool:
        """Wait until every prompt is accepted; False on timeout (e.g. the model is still
        loading). Raises the request's APIError if the worker refused it."""
        waiting = set(self._handles) - self._accepted
        deadline = None if timeout is None else time.monotonic() + timeout
        while waiting:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                msg = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                return False
            if isinstance(msg, Accepted):
                waiting.discard(msg.request_id)
                self._record(msg)
            else:
                self._check_error(msg)
                self._buffer.append(msg)
        return True

    def accepted(self, request_id: str) -> Accepted | None:
        """The ACCEPTED message of one prompt, once `accept()` has seen it."""
        return self._replies.get(request_id)

    def _record(self, msg: Accepted) -> None:
        self._accepted.add(msg.request_id)
        self._replies[msg.request_id] = msg
        facts = self.facts[self._prompt_index[msg.request_id]]
        facts.prompt_tokens = msg.prompt_tokens
        facts.cached_tokens = msg.cached_tokens
        facts.cache_source = msg.cache_source
        facts.cache_miss_reason = msg.cache_miss_reason

    def _check_error(self, msg: Message) -> None:
        if isinstance(msg, Error):
            self._handles[msg.request_id].done = True
            raise from_error(msg)

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """(global choice index, delta) until all choices finished."""
        while self._left > 0:
            msg = self._buffer.pop(0) if self._buffer else await self._queue.get()
            if isinstance(msg, Accepted):
                self._record(msg)
                continue
            self._check_error(msg)
            if not isinstance(msg, Delta):
                continue
            if self.first_token_at is None and msg.token_ids:
                self.first_token_at = time.monotonic()
            p = self._prompt_index[msg.request_id]
            if msg.finish_reason is not None:
                self._left -= 1
                if msg.finish_reason == FinishReason.ABORT:
                    raise APIError("the request was aborted")
                if msg.finish_reason == FinishReason.ERROR:
                    raise from_kind(
                        msg.error_kind or ErrorKind.GENERATION_FAILED,
                        msg.error_message or "generation failed",
                    )
                self._finished[p] += 1
                if self._finished[p] >= self.n:
                    self._handles[msg.request_id].done = True
            yield p * self.n + msg.index, msg
