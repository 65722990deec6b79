"""The engine step: schedule -> run -> postprocess, with no sockets in it (DESIGN.md §3).

`step(inputs)` takes what arrived since the last step (requests, aborts, cache clears)
and returns the protocol messages to send (ACCEPTED, OUTPUT, ERROR). Tests drive it
directly; the worker's loop only moves inputs in and messages out.

One step:
1. admit new requests (prompt-cache lookup, ACCEPTED) and apply aborts;
2. decode: sample the tokens of the forward pass queued last step, queue the next forward
   pass at once, then post-process the sampled tokens while the model runs (pipelining);
3. prefill what the scheduler planned: prompts that finish this step run as one padded
   batch, sample their first token and join the decode batch.
The scheduler owns the queues, the model runner the tensors, the prompt cache RAM vs disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np

from ..constraints import GuidedError
from ..protocol import (
    Abort,
    Accepted,
    Control,
    Delta,
    Error,
    ErrorKind,
    FinishReason,
    Message,
    Output,
)
from .loader import LoadedModel
from .params import RequestError
from .prompt_cache import PromptCache, plain
from .prompt_scores import entries
from .runner import ModelRunner
from .sampler import RowState, sample, sample_lazy, top_logprobs
from .scheduler import PrefillChunk, QueueFull, Request, Scheduler
from .sequence import RequestPayload, Sequence, logprob_entry
from .text import TextStream, TokenBytes

log = logging.getLogger("mlxtg.worker")

PUBLISH_EVERY_S = 0.2  # how fresh the stats snapshot the I/O thread reads is


class Engine:
    """One worker's generation engine. Called from one thread only (the MLX thread)."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompt_cache: PromptCache,
        guided: Any = None,
        scheduler: Scheduler | None = None,
        batched_prefill: bool = True,
        overlap: bool | None = None,
    ):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.vocab_size
        self.eos_ids = frozenset(loaded.eos_ids)
        self.prompt_cache = prompt_cache
        self.guided = guided  # GuidedCompiler or None
        self.batched_prefill = batched_prefill
        self.scheduler = scheduler or Scheduler(padded=batched_prefill)
        self.runner = ModelRunner(loaded.model)
        # A rank of a distributed model (distributed.py): every rank must take the same
        # decisions, so a fault that is not a property of the request (out of memory, a lost
        # peer) takes the whole group down instead of failing requests on one rank only.
        self.mirrored = False
        # Pipelining needs an asynchronous device. On MLX's CPU backend `async_eval` runs
        # most of a forward pass before it returns, so there the next forward pass starts
        # only after the step's tokens are post-processed and handed over.
        self.overlap = mx.default_device() == mx.gpu if overlap is None else overlap
        self._next_inputs: mx.array | None = None
        self.token_bytes = TokenBytes(loaded.tokenizer._tokenizer)
        self.tokens_generated = 0
        self.mask_seconds = 0.0  # time spent computing guided masks in decode steps
        self.mask_rows = 0  # guided rows masked (one per constrained token)
        self.steps = 0
        self._published = 0.0
        self.snapshot: dict[str, Any] = {}
        self.publish()

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    # --- the step --------------------------------------------------------------------------

    def step(
        self,
        inputs: Iterable[Any] = (),
        flush: Callable[[list[Message]], None] | None = None,
    ) -> list[Message]:
        """Run one engine step. With `flush`, the decode tokens are handed over before the
        step's prefill work starts (streams never wait for arrivals' prefill) and only the
        rest is returned."""
        out: list[Message] = []
        # 1. Inputs.
        for item in inputs:
            if isinstance(item, Request):
                out += self._admit(item)
            elif isinstance(item, Abort):
                deltas = self._abort(item.request_id)
                if deltas:
                    out.append(Output(deltas=deltas))
            elif isinstance(item, Control):
                self.prompt_cache.clear()
        # 2. Decode.
        decoded, failed = self._guarded(self._decode, self.scheduler.running)
        out += failed
        if decoded:
            out.append(Output(deltas=decoded))
        if flush is not None and out:
            flush(out)
            out = []
        _, failed = self._guarded(self._launch, self.scheduler.running)
        out += failed
        # 3. Prefill.
        out += self._prefill()
        self.steps += 1
        self.publish(force=self.idle)
        return out

    # --- 1. admission and aborts -----------------------------------------------------------

    def _admit(self, req: Request) -> list[Message]:
        try:
            self.scheduler.add(req)
        except QueueFull:
            return [
                Error(
                    request_id=req.request_id,
                    kind=ErrorKind.QUEUE_FULL,
                    message="the model's request queue is full; retry shortly",
                    retry_after=1.0,
                )
            ]
        payload = req.payload
        miss: str | None
        if payload is not None and payload.scores_prompt:
            # Scoring needs the logits of every prompt position: no cached prefix.
            req.cache, req.num_computed = self.runner.new_cache(), 0
            source, miss = "none", "prompt_logprobs"
        else:
            found = self.prompt_cache.lookup(req.prompt, getattr(payload, "cache_key", None))
            req.cache = found.cache if found.cache is not None else self.runner.new_cache()
            req.num_computed = found.tokens if found.cache is not None else 0
            source, miss = found.source, found.miss_reason
            tail = getattr(payload, "tail_at", 0)
            if tail > max(req.num_computed, 0) and not plain(req.cache):
                req.boundary = tail  # trimmable caches are sliced there anyway
        return [
            Accepted(
                request_id=req.request_id,
                prompt_tokens=len(req.prompt),
                cached_tokens=req.num_computed,
                cache_source=source,
                cache_miss_reason=miss,
                prompt_text=getattr(payload, "echo_text", None),
            )
        ]

    def _abort(self, request_id: str) -> list[Delta]:
        running = self.scheduler.running
        deltas = [s.abort() for s in running if s.request_id == request_id]
        if deltas:
            self._keep(lambda s: s.request_id != request_id)
        if self.scheduler.remove(request_id) is not None:
            deltas.append(Delta(request_id=request_id, finish_reason=FinishReason.ABORT))
        return deltas

    # --- 2. decode -------------------------------------------------------------------------

    def _decode(self) -> list[Delta]:
        running = self.scheduler.running
        if not running:
            return []
        k = self.runner.pending_rows
        if k == 0:
            # Only rows that just joined: start their forward pass and decode it in this
            # same step, so a stream's second token is one forward pass after its first.
            fresh_only = mx.array([s.last_token for s in running], dtype=mx.int32)
            self.runner.queue_decode(fresh_only)
            k = len(running)
        rows = running[:k]  # rows whose logits are in flight; the rest joined since
        started = time.perf_counter()
        masks = self._masks(rows)  # CPU work overlapping the forward pass in flight
        if masks is not None:
            self.mask_seconds += time.perf_counter() - started
            self.mask_rows += sum(1 for s in rows if s.row.guide is not None)
        assert self.runner.pending is not None
        pending = sample_lazy(self.runner.pending, [s.row for s in rows], masks)
        # Scheduled before the next forward pass, so reading it back does not wait for it.
        mx.async_eval(pending.chosen)
        fresh = [s.last_token for s in running[k:]]
        parts = [pending.chosen]
        if fresh:
            parts.append(mx.array(fresh, dtype=mx.int32))
        # Skip the next forward pass only when every row surely ends with this token.
        if fresh or any(len(s.output) + 1 < s.max_tokens for s in rows):
            self._next_inputs = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        self.runner.pending = None
        if self.overlap:
            self._launch()  # the model runs while this step's tokens are post-processed
        result = pending.result()
        deltas = [self._advance(s, i, result) for i, s in enumerate(rows)]
        self._drop_finished()
        return deltas

    def _launch(self) -> None:
        """Queue the next decode forward pass, if the last decode asked for one."""
        inputs, self._next_inputs = self._next_inputs, None
        if inputs is not None:
            self.runner.queue_decode(inputs)

    def _masks(self, seqs: list[Sequence]) -> np.ndarray | None:
        """(B, V) allowed tokens for a batch with guided rows or forced reasoning ends
        (other rows all True); None when no row is constrained."""
        guides = [s.row.guide for s in seqs]
        guided = self.guided is not None and any(g is not None for g in guides)
        forced = [s.tracker.forced() if s.tracker is not None else None for s in seqs]
        if not guided and all(f is None for f in forced):
            return None
        masks: np.ndarray
        if guided:
            masks = self.guided.batch_masks(guides)
        else:
            masks = np.ones((len(seqs), self.vocab_size), dtype=bool)
        for i, token in enumerate(forced):
            # A reasoning cap is spent: the end marker's next token is the only choice,
            # unless the grammar cannot take it yet (then the next step tries again).
            if token is not None and token < masks.shape[1] and masks[i, token]:
                masks[i] = False
                masks[i, token] = True
        return masks

    def _advance(self, seq: Sequence, row: int, result: Any) -> Delta:
        token = result.tokens[row]
        entry = None
        params = seq.row.params
        if params.logprobs and result.logprobs is not None:
            lp = float(result.logprobs[row, token].item())
            top = (
                top_logprobs(result.logprobs, row, params.top_logprobs)
                if params.top_logprobs
                else []
            )
            entry = logprob_entry(self.token_bytes, token, lp, top)
        self.tokens_generated += 1
        return seq.advance(token, entry)

    def _drop_finished(self) -> None:
        running = self.scheduler.running
        if not any(s.finished for s in running):
            return
        if self.prompt_cache.enabled and self.runner.cache is not None:
            for i, s in enumerate(running):
                if s.finished and s.index == 0 and s.finish_reason != FinishReason.ERROR:
                    # The cache holds the prompt and the output tokens fed back so far.
                    cache = self.runner.extract(i)
                    size = cache[0].offset if cache else 0
                    tokens = (s.prompt + s.output)[:size]
                    if len(tokens) == size:
                        self.prompt_cache.store(tokens, cache, s.session)
        self._keep(lambda s: not s.finished)

    def _keep(self, keep: Callable[[Sequence], bool]) -> None:
        total = len(self.scheduler.running)
        rows = self.scheduler.keep(keep)
        self.runner.keep(rows, total)
        if self._next_inputs is not None and len(rows) < total:
            self._next_inputs = self._next_inputs[mx.array(rows)] if rows else None

    # --- 3. prefill ------------------------------------------------------------------------

    def _prefill(self) -> list[Message]:
        plan = self.scheduler.schedule()
        out: list[Message] = []
        if plan.partial is not None:
            chunk = plan.partial
            req = chunk.request
            _, failed = self._guarded(lambda: self._prefill_chunk(chunk), [req])
            if not failed:
                self.scheduler.complete(chunk)
                if chunk.end == req.boundary:  # the next turn's prompt starts with this
                    self.prompt_cache.checkpoint(req.prompt[: chunk.end], req.cache)
            out += failed
        deltas: list[Delta] = []
        for more in plan.slices:
            req = more.request
            work = partial(self._start_slice, req, more.choices)
            started, failed = self._guarded(work, [req])
            deltas += started or []
            out += failed
        for group in self._groups(plan.final):
            started, failed = self._guarded(partial(self._start, group), [c.request for c in group])
            deltas += started or []
            out += failed
        if deltas:
            out.append(Output(deltas=deltas))
        return out

    def _prefill_chunk(self, chunk: PrefillChunk) -> mx.array | None:
        """Prefill one chunk of one prompt at batch 1; the last position's logits (1, V)
        when the prompt is scored, which keeps every position's scores on the request."""
        req = chunk.request
        tokens = req.prompt[chunk.start : chunk.end]
        if not req.payload.scores_prompt:
            self.runner.prefill_chunk(req.cache, tokens)
            return None
        # Position t scores token t + 1; the prompt's last position predicts the reply.
        targets = req.prompt[chunk.start + 1 : chunk.end + 1]
        k = req.payload.params.prompt_logprobs
        last, scores = self.runner.prefill_scored(req.cache, tokens, targets, k)
        req.prompt_scores.append(scores)
        return last

    def _groups(self, chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
        """Prompts that finish together run as one batch when their caches allow it; a
        scored prompt runs alone (it needs every position's logits)."""
        if not self.batched_prefill or len(chunks) < 2:
            return [[c] for c in chunks]

        def batchable(c: PrefillChunk) -> bool:
            return plain(c.request.cache) and not c.request.payload.scores_prompt

        batch = [c for c in chunks if batchable(c)]
        alone = [[c] for c in chunks if not batchable(c)]
        return ([batch] if batch else []) + alone

    def _start(self, chunks: list[PrefillChunk]) -> list[Delta]:
        """Prefill the rests of these prompts, sample the first token of the choices the
        plan starts, and join those that go on into the decode batch. A request whose other
        choices must wait for rows keeps its prompt cache and first-token logits."""
        reqs = [c.request for c in chunks]
        rests = [r.prompt[c.start :] for r, c in zip(reqs, chunks, strict=True)]
        batch: list[Any] | None = None
        logits: mx.array | None
        if len(reqs) == 1 and reqs[0].payload.scores_prompt:
            logits = self._prefill_chunk(chunks[0])
        elif len(reqs) == 1:
            logits = self.runner.prefill_alone(reqs[0].cache, rests[0])
        else:
            batch, logits = self.runner.prefill_batch([r.cache for r in reqs], rests)
        assert logits is not None
        takes = [c.choices or r.pending for r, c in zip(reqs, chunks, strict=True)]
        for i, r in enumerate(reqs):
            if not plain(r.cache):
                self.prompt_cache.checkpoint(r.prompt, r.cache)
            if takes[i] < r.n:  # the rest of its choices start later, from these
                r.first_logits = logits[i : i + 1]
                if batch is not None:
                    r.cache = [c.extract(i) for c in batch]
                mx.eval(r.first_logits, [c.state for c in r.cache])
        for c in chunks:
            self.scheduler.complete(c)

        seqs: list[Sequence] = []
        owner: list[int] = []  # which prompt (row of `logits`) each choice comes from
        for i, r in enumerate(reqs):
            seqs += self._choices(r, r.started - takes[i], takes[i])
            owner += [i] * takes[i]
        if owner != list(range(len(reqs))):
            logits = logits[mx.array(owner)]
        deltas, live = self._first_tokens(seqs, logits)
        for i, r in enumerate(reqs):
            if r.pending == 0 and not any(owner[k] == i for k in live):
                # Every choice ended at its first token: the prompt's cache is still worth keeping.
                cache = r.cache if batch is None else [c.extract(i) for c in batch]
                self.prompt_cache.store_prompt(r.prompt, cache, r.payload.cache_key)
        if live:
            if batch is None:
                rows = self.runner.as_batch(reqs[0].cache, len(live))
            else:
                rows = self.runner.select(batch, [owner[k] for k in live])
            self.runner.join(rows)
            self.scheduler.join([seqs[k] for k in live])
        for r in reqs:
            if r.pending == 0:
                self._release(r)
        return deltas

    def _start_slice(self, req: Request, count: int) -> list[Delta]:
        """Start `count` more choices of a request whose prompt is already prefilled, from
        its kept prompt cache and first-token logits (no forward pass)."""
        first = req.started
        self.scheduler.start(req, count)
        seqs = self._choices(req, first, count)
        logits = req.first_logits[mx.zeros(count, dtype=mx.int32)]
        deltas, live = self._first_tokens(seqs, logits)
        if req.pending == 0 and not live:
            self.prompt_cache.store_prompt(req.prompt, req.cache, req.payload.cache_key)
        if live:
            self.runner.join(self.runner.as_batch(req.cache, len(live)))
            self.scheduler.join([seqs[k] for k in live])
        if req.pending == 0:
            self._release(req)
        return deltas

    def _choices(self, req: Request, first: int, count: int) -> list[Sequence]:
        """New sequences for choices first..first+count-1 (the index seeds each one, so a
        choice's output does not depend on when it starts)."""
        scored = (
            entries(self.token_bytes, req.prompt, req.prompt_scores) if req.prompt_scores else None
        )
        seqs = []
        for j in range(first, first + count):
            seq = self._new_sequence(req, req.payload, j)
            seq.prompt_logprobs = scored
            seqs.append(seq)
        return seqs

    def _first_tokens(
        self, seqs: list[Sequence], logits: mx.array
    ) -> tuple[list[Delta], list[int]]:
        """Sample each new choice's first token; the deltas and the rows that go on."""
        result = sample(logits, [s.row for s in seqs], self._masks(seqs))
        deltas = [
            self._advance(s, i, result) if s.max_tokens > 0 else s.finish_empty()
            for i, s in enumerate(seqs)
        ]
        return deltas, [k for k, s in enumerate(seqs) if not s.finished]

    @staticmethod
    def _release(req: Request) -> None:
        req.cache = None
        req.first_logits = None

    def _new_sequence(self, req: Request, payload: RequestPayload, index: int) -> Sequence:
        params, plan = payload.params, payload.reasoning
        guide = None
        if payload.guide_spec is not None and self.guided is not None:
            after = () if payload.guide_prefix is None else (payload.guide_prefix,)
            guide = self.guided.new_state(payload.guide_spec, *after)
        row = RowState.create(
            params,
            self.vocab_size,
            req.prompt,
            seed_offset=index,
            guide=guide,
            eos_ids=list(self.eos_ids),
        )
        return Sequence(
            request_id=req.request_id,
            index=index,
            prompt=req.prompt,
            session=payload.cache_key,
            row=row,
            text=TextStream(
                self.tokenizer.detokenizer,
                params.stop,
                self.token_bytes if payload.continues_prompt else None,
                plan.splitter() if plan is not None else None,
            ),
            max_tokens=payload.max_tokens,
            eos_ids=self.eos_ids,
            parser=payload.parser_factory() if payload.parser_factory else None,
            tracker=plan.tracker() if plan is not None else None,
            token_bytes=self.token_bytes,
        )

    # --- faults ----------------------------------------------------------------------------

    def _guarded(self, work: Callable[[], Any], victims: list[Any]) -> tuple[Any, list[Message]]:
        """Run `work`; if it raises, fail only the requests it was for (running sequences
        or waiting requests), so one request's fault never harms the others."""
        try:
            return work(), []
        except Exception as exc:
            if self.mirrored and not isinstance(exc, RequestError | GuidedError):
                raise  # the same on every rank only when the request itself is at fault
            log.exception("engine step failed")
            rids = list(dict.fromkeys(v.request_id for v in victims))
            for rid in rids:
                self._abort(rid)
            if any(isinstance(v, Sequence) for v in victims):  # the decode batch was hit
                self.runner.pending = None
                self._next_inputs = None
            kind = exc.kind if isinstance(exc, RequestError) else ErrorKind.INTERNAL
            return None, [
                Error(request_id=rid, kind=kind, message=f"generation failed: {exc}")
                for rid in rids
            ]

    # --- stats -----------------------------------------------------------------------------

    def publish(self, force: bool = False) -> None:
        """Replace the stats snapshot the I/O thread reads (it never reads live state)."""
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_EVERY_S:
            return
        self._published = now
        snap: dict[str, Any] = {
            "running": self.scheduler.num_running,
            "queued": len(self.scheduler.waiting),
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "prompt_tokens_computed": self.runner.prompt_tokens_computed,
            "kv_bytes": self.runner.kv_bytes(),
            "guided": {
                "mask_seconds": round(self.mask_seconds, 4),
                "masked_tokens": self.mask_rows,
                **(self.guided.stats if self.guided is not None else {}),
            },
            **self.prompt_cache.stats(),
        }
        try:
            import psutil

            snap["mlx_active_bytes"] = int(mx.get_active_memory())
            snap["mlx_peak_bytes"] = int(mx.get_peak_memory())
            # Freed buffers MLX keeps for reuse: what RSS holds beyond active memory.
            snap["mlx_cache_bytes"] = int(mx.get_cache_memory())
            snap["rss_bytes"] = int(psutil.Process().memory_info().rss)
        except Exception:  # stats must never break a step
            pass
        self.snapshot = snap
