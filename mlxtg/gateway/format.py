"""OpenAI wire format: response bodies, stream chunks, usage and logprobs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..protocol import Delta, LogprobEntry, ToolCallFragment


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int = 0
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens:  # a model that reasoned: its thinking is part of completion_tokens
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def chat_logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
    return {
        "refusal": None,  # required (nullable) by OpenAI's schema
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top],
            }
            for e in entries
        ],
    }


def completion_logprobs(
    entries: list[LogprobEntry], offset: int, prompt: list[LogprobEntry] | None = None
) -> dict[str, Any]:
    """The legacy completions format, plus chat-style `content` entries with bytes.
    With `echo`, the prompt's entries come first (offsets from 0, the first with null
    logprobs, as OpenAI's and vLLM's), then the generated ones from `offset`."""
    offsets = []
    at = 0
    for e in prompt or ():
        offsets.append(at)
        at += len(e.token)
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    entries = [*(prompt or ()), *entries]
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            None if e.logprob is None else {t: lp for t, lp, _ in e.top} for e in entries
        ],
        "text_offset": offsets,
        "content": chat_logprobs(entries)["content"],
    }


@dataclass(slots=True)
class ChoiceAccumulator:
    """Collects one choice's deltas for a non-streamed response."""

    index: int
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # a reasoning model's thinking
    logprobs: list[LogprobEntry] = field(default_factory=list)
    prompt_logprobs: list[LogprobEntry] | None = None  # echo with logprobs
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    stop_sequence: str | None = None

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.text.append(delta.text)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs:
            self.prompt_logprobs = delta.prompt_logprobs
        for frag in delta.tool_calls or ():
            call = self.tool_calls.setdefault(
                frag.index,
                {"id": None, "type": "function", "function": {"name": None, "arguments": ""}},
            )
            if frag.id:
                call["id"] = frag.id
            if frag.name:
                call["function"]["name"] = frag.name
            call["function"]["arguments"] += frag.arguments
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.completion_tokens = delta.completion_tokens
            self.reasoning_tokens = delta.reasoning_tokens
            self.stop_sequence = delta.stop_sequence

    def chat_choice(self, include_reasoning: bool = True) -> dict[str, Any]:
        content = "".join(self.text)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        reasoning = "".join(self.reasoning)
        if reasoning and include_reasoning:
            message.update(reasoning_from(reasoning))
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            message["content"] = content or None
        return {
            "index": self.index,
            "message": message,
            "logprobs": chat_logprobs(self.logprobs) if self.logprobs else None,
            "finish_reason": self.finish_reason,
        }

    def completion_choice(self, echo: str = "") -> dict[str, Any]:
        return {
            "index": self.index,
            "text": echo + "".join(self.text),
            "logprobs": (
                completion_logprobs(self.logprobs, len(echo), self.prompt_logprobs)
                if self.logprobs or self.prompt_logprobs
                else None
            ),
            "finish_reason": self.finish_reason,
        }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def reasoning_from(text: str) -> dict[str, str]:
    """Both names clients read the reasoning under (vLLM's old and new, Vercel AI SDK's)."""
    return {"reasoning_content": text, "reasoning": text}


def chat_delta(delta: Delta) -> dict[str, Any]:
    """A stream chunk's delta."""
    out: dict[str, Any] = {}
    if delta.text:
        out["content"] = delta.text
    if delta.tool_calls:
        out["tool_calls"] = [openai_fragment(f) for f in delta.tool_calls]
    return out


def openai_fragment(frag: ToolCallFragment) -> dict[str, Any]:
    """OpenAI's streamed tool-call piece: {index, id?, type?, function: {name?, arguments}}."""
    out: dict[str, Any] = {"index": frag.index}
    fn: dict[str, str] = {}
    if frag.id is not None:
        out["id"] = frag.id
        out["type"] = "function"
    if frag.name is not None:
        fn["name"] = frag.name
    fn["arguments"] = frag.arguments
    out["function"] = fn
    return out


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = (
        data
        if isinstance(data, str)
        else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    )
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
