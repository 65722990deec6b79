"""One generated choice: its sampler state, text stream, tool-call parser, reasoning
tracker, and the rules that decide when it ends. `advance` turns one sampled token into one
protocol Delta."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..protocol import Delta, ErrorKind, FinishReason, LogprobEntry, ToolCallFragment
from .reasoning import ReasoningPlan, ReasoningTracker
from .sampler import RowState
from .text import TextStream, TokenBytes


@dataclass(slots=True)
class RequestPayload:
    """Everything about a request besides its prompt, built by `preprocess`."""

    params: Any  # SamplingParams
    max_tokens: int
    guide_spec: Any = None  # GuidedSpec or None
    guide_prefix: str | None = None  # the reasoning block the constraint comes after (Lark)
    parser_factory: Any = None  # () -> ToolCallParser, when tool calls are parsed
    cache_key: str | None = None  # prompt_cache_key / user: keeps a session's cache
    reasoning: ReasoningPlan | None = None  # chat with a reasoning model
    tail_at: int = 0  # where the template's reasoning tail starts in the prompt (0: none)
    continues_prompt: bool = False  # completions: the text goes on from the prompt's text
    echo_text: str | None = None  # `echo` of a token-id prompt: its text, for ACCEPTED

    @property
    def scores_prompt(self) -> bool:
        return self.params.prompt_logprobs is not None


@dataclass(slots=True)
class Sequence:
    request_id: str
    index: int
    prompt: list[int]
    session: str | None
    row: RowState
    text: TextStream
    max_tokens: int
    eos_ids: frozenset[int]
    parser: Any = None  # ToolCallParser or None
    output: list[int] = field(default_factory=list)
    last_token: int = -1
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[LogprobEntry] | None = None  # sent on the first delta, then dropped
    error: str | None = None  # why it ended with finish_reason "error"
    # A reasoning model's chat: follows the raw bytes (count, phase, forced end marker).
    tracker: ReasoningTracker | None = None
    token_bytes: Any = None  # TokenBytes, for the tracker

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(self, token: int, logprobs: LogprobEntry | None) -> Delta:
        """Account for one sampled token and say what the client sees."""
        self.last_token = token
        self.output.append(token)
        if self.tracker is not None:
            self.tracker.feed(token, self.token_bytes(token)[1])
        params = self.row.params
        guide = self.row.guide
        text = ""
        reason: FinishReason | None = None

        # 1. End of sequence token: stops, emits no text (and no logprobs entry, so that the
        # entries' tokens join to exactly the text). A scored prompt keeps it: log-likelihood
        # clients count one entry per prompt token plus one per generated token.
        if token in self.eos_ids and not params.ignore_eos:
            reason = FinishReason.STOP
            if params.prompt_logprobs is None:
                logprobs = None
        else:
            if guide is not None:
                try:
                    guide.consume(token)
                except ValueError as exc:  # the mask allowed a token the constraint refuses
                    reason = FinishReason.ERROR
                    self.error = f"generation failed: {exc}"
                if reason is None and guide.is_finished():
                    reason = FinishReason.STOP
            # 2. Text, with stop strings held back and cut.
            text = self.text.push(token)
            if self.text.stopped:
                reason = FinishReason.STOP
        # 3. Length.
        if reason is None and len(self.output) >= self.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and not self.text.stopped:
            text += self.text.finish()
        if logprobs is not None and len(self.output) == 1 and self.text.trims_first_space:
            logprobs = _without_leading_space(logprobs)
        return self._delta(token, text, reason, logprobs)

    def abort(self) -> Delta:
        return self._finish_delta(FinishReason.ABORT)

    def finish_empty(self) -> Delta:
        """`max_tokens` 0: the choice ends before its first token (the prompt is still
        prefilled, and scored when asked)."""
        return self._finish_delta(FinishReason.LENGTH)

    def _finish_delta(self, reason: FinishReason) -> Delta:
        self.finish_reason = reason
        return Delta(
            request_id=self.request_id,
            index=self.index,
            finish_reason=reason,
            completion_tokens=len(self.output),
            prompt_logprobs=self._take_prompt_logprobs(),
            reasoning_tokens=self._reasoning_tokens(),
        )

    def _reasoning_tokens(self) -> int:
        return self.tracker.reasoning_tokens if self.tracker is not None else 0

    def _take_prompt_logprobs(self) -> list[LogprobEntry] | None:
        entries, self.prompt_logprobs = self.prompt_logprobs, None
        return entries

    def _delta(
        self, token: int, text: str, reason: FinishReason | None, logprobs: LogprobEntry | None
    ) -> Delta:
        tool_calls: list[ToolCallFragment] | None = None
        # `text` is the answer only: reasoning never reaches the tool parser.
        if self.parser is not None:
            parsed = self.parser.feed(text) if text else None
            content = parsed.content if parsed else ""
            calls = list(parsed.tool_calls) if parsed else []
            if reason is not None:
                tail = self.parser.finish()
                content += tail.content
                calls += tail.tool_calls
                if self.parser.called and reason == FinishReason.STOP:
                    reason = FinishReason.TOOL_CALLS
            text = content
            tool_calls = calls or None
        self.finish_reason = reason
        failed = reason == FinishReason.ERROR
        return Delta(
            request_id=self.request_id,
            index=self.index,
            text=text,
            token_ids=[token],
            logprobs=[logprobs] if logprobs is not None else None,
            tool_calls=tool_calls,
            finish_reason=reason,
            completion_tokens=len(self.output),
            stop_sequence=self.text.matched if reason is not None else None,
            prompt_logprobs=self._take_prompt_logprobs(),
            error_kind=ErrorKind.GENERATION_FAILED if failed else None,
            error_message=self.error if failed else None,
            reasoning=self.text.take_reasoning(),
            reasoning_tokens=self._reasoning_tokens() if reason is not None else 0,
        )


def _without_leading_space(entry: LogprobEntry) -> LogprobEntry:
    """The entry of a chat reply's first token, minus the space its text lost; the
    alternatives lose theirs too, as they would have had they been chosen."""
    if not entry.bytes or entry.bytes[0] != 0x20:
        return entry
    top = [(t[1:], lp, b[1:]) if b[:1] == [0x20] else (t, lp, b) for t, lp, b in entry.top]
    return LogprobEntry(token=entry.token[1:], logprob=entry.logprob, bytes=entry.bytes[1:], top=top)


def logprob_entry(
    token_bytes: TokenBytes, token: int, logprob: float, top: list[tuple[int, float]]
) -> LogprobEntry:
    text, raw = token_bytes(token)
    alts = []
    for tid, lp in top:
        t, b = token_bytes(tid)
        alts.append((t, lp, b))
    return LogprobEntry(token=text, logprob=logprob, bytes=raw, top=alts)
