"""Pydantic models of the OpenAI request bodies we accept.

Unknown fields are accepted and ignored (and logged), so real clients that send fields
we do not know keep working. Ranges follow OpenAI's documentation.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..protocol import ReasoningEffort, ReasoningRequest, SamplingParams

log = logging.getLogger("mlxtg.gateway")

_GUIDED_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_allow_additional_properties",
    "response_format",
    "structured_outputs",
)


INT64 = 2**63 - 1


class NullMeansDefault(BaseModel):
    """Explicit `null` for a field with a default means the default: the official SDKs send
    null whenever a caller passes None (`temperature=cfg.get("temperature")`)."""

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            drop = [
                k
                for k, v in data.items()
                if v is None and k in fields and fields[k].get_default() is not None
            ]
            if drop:
                data = {k: v for k, v in data.items() if k not in drop}
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


MAX_LOGIT_BIAS = 1 << 18  # the worker further caps it at the model's vocabulary size


class _Common(NullMeansDefault):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=INT64)  # < 0: random, as llama.cpp
    user: str | None = None
    prompt_cache_key: str | None = None
    ignore_eos: bool = False
    # Guided decoding (vLLM spellings and OpenAI's response_format); checked by guided.py.
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[Any] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    # Opt-out: objects without "additionalProperties" stay open, as JSON Schema's letter says.
    guided_allow_additional_properties: bool | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_size(cls, v: Any) -> Any:
        # Before pydantic converts every entry: a million-key map is refused at once.
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias has {len(v)} entries; at most {MAX_LOGIT_BIAS} (one per token of "
                "the largest vocabularies) are accepted"
            )
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            try:
                int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias value for {key} must be within [-100, 100]")
        return v

    @model_validator(mode="after")
    def _log_unknown(self) -> _Common:
        if self.model_extra:
            log.debug("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def guided_body(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _GUIDED_FIELDS if getattr(self, k) is not None}

    def sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            seed=self.seed if self.seed is None or self.seed >= 0 else None,
            stop=self.stop_list(),
            max_tokens=max_tokens,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def cache_key(self) -> str | None:
        return self.prompt_cache_key or self.user


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """Flatten content parts to text (what text-only chat templates expect)."""
        out = self.model_dump(exclude_none=True)
        if out.get("role") == "developer":
            out["role"] = "system"
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") not in ("text", "input_text"):
                    raise ValueError(
                        f"content part type {part.get('type')!r} is not supported (text only)"
                    )
                texts.append(str(part.get("text", "")))
            out["content"] = "".join(texts)
        return out


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Reasoning models: a cap on thinking tokens (vLLM's thinking_token_budget is the same
    # field), whether the reply carries the thinking, and the effort the template may take.
    max_reasoning_tokens: int | None = Field(default=None, ge=0, le=INT64)
    thinking_token_budget: int | None = Field(default=None, ge=0, le=INT64)
    include_reasoning: bool = True
    reasoning_effort: ReasoningEffort | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.max_reasoning_tokens is not None and self.thinking_token_budget is not None:
            raise ValueError(
                "give max_reasoning_tokens or thinking_token_budget (the same cap), not both"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if isinstance(self.tool_choice, dict):
            fn = self.tool_choice.get("function")
            if (
                self.tool_choice.get("type") != "function"
                or not isinstance(fn, dict)
                or not fn.get("name")
            ):
                raise ValueError(
                    'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
                )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    def params(self) -> SamplingParams:
        limit = self.max_completion_tokens or self.max_tokens
        return self.sampling(limit, self.logprobs, self.top_logprobs or 0)

    def reasoning(self) -> ReasoningRequest | None:
        """What the request asks of a reasoning model (None: nothing)."""
        cap = (
            self.max_reasoning_tokens
            if self.max_reasoning_tokens is not None
            else self.thinking_token_budget
        )
        if cap is None and self.reasoning_effort is None:
            return None
        return ReasoningRequest(effort=self.reasoning_effort, max_tokens=cap)

    def effective_tool_choice(self) -> Any:
        if not self.tools:
            return None
        return self.tool_choice or "auto"


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    # 0 is allowed: with `echo` and `logprobs` it scores the prompt and generates nothing.
    max_tokens: int | None = Field(default=16, ge=0, le=INT64)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def params(self) -> SamplingParams:
        wants = self.logprobs is not None
        params = self.sampling(self.max_tokens, wants, self.logprobs or 0)
        if self.echo and wants:
            params.prompt_logprobs = self.logprobs
        return params
