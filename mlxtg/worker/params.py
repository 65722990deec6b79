"""Per-request sampling parameters, as the worker sees them.

The gateway validates types and ranges with pydantic; this record is what travels on the
wire (`to_wire` / `from_wire`) and what the sampler reads. Checks that need the model
(vocabulary size, context length) happen in the worker (`validate_against`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..protocol import ErrorKind


class RequestError(ValueError):
    """A request the worker refuses; sent as an ERROR of its `kind`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        kind: ErrorKind = ErrorKind.INVALID_REQUEST,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.retry_after = retry_after


MIN_TEMPERATURE = 1e-3
MIN_REPETITION_PENALTY = 1e-3  # smaller ones overflow the logits they multiply
MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = None  # None = up to the context length
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # Completions `echo` with `logprobs`: score every prompt token too, with this many
    # alternatives per position (None: the prompt is not scored).
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        # Below this, dividing logits by the temperature only risks inf/NaN (1e-38 is a valid
        # temperature per OpenAI's spec); the distribution is already all on the argmax.
        return self.temperature < MIN_TEMPERATURE

    @property
    def needs_filtering(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def to_wire(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any], vocab_size: int | None = None) -> SamplingParams:
        """The record from its wire form. With `vocab_size`, a `logit_bias` with more entries
        than the vocabulary has tokens is refused before its entries are converted."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "logit_bias" in kwargs:
            bias = kwargs["logit_bias"]
            if vocab_size is not None and len(bias) > vocab_size:
                # More entries than tokens: some are duplicates or not tokens at all.
                raise RequestError(
                    f"logit_bias has {len(bias)} entries; this model's vocabulary has "
                    f"{vocab_size} tokens, at most one entry each",
                    param="logit_bias",
                )
            kwargs["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        return cls(**kwargs)

    def validate_against(self, vocab_size: int) -> None:
        """Checks that need the model: token ids in `logit_bias` must exist."""
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(
                f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs"
            )
        ids = self.logit_bias
        # min and max run in C: a map of a vocabulary's size is checked in milliseconds.
        if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise RequestError(
                f"logit_bias token id {bad} is outside the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )


def resolve_max_tokens(
    params: SamplingParams,
    prompt_tokens: int,
    context_length: int,
    param: str = "max_tokens",
    at_least: bool = False,
) -> int:
    """How many tokens a request may generate; a 400 that states both numbers on overflow.
    With `at_least`, `prompt_tokens` is a lower bound (the prompt was not tokenised)."""
    room = context_length - prompt_tokens
    some = "at least " if at_least else ""
    if params.max_tokens is None:
        if room <= 0:
            raise RequestError(
                f"This model's maximum context length is {context_length} tokens, but the "
                f"prompt has {some}{prompt_tokens} tokens, leaving no room to generate.",
                param="messages",
                kind=ErrorKind.CONTEXT_OVERFLOW,
            )
        return room
    if prompt_tokens + params.max_tokens > context_length:
        raise RequestError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {some}{prompt_tokens + params.max_tokens} tokens ({some}{prompt_tokens} "
            f"in the prompt, {params.max_tokens} for the completion). Please reduce the prompt or "
            f"{param}.",
            param=param,
            kind=ErrorKind.CONTEXT_OVERFLOW,
        )
    return params.max_tokens
