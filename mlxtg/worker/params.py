"""Per-request sampling parameters, as the worker checks them.

The gateway validates types and ranges with pydantic; the record itself travels on the
wire (protocol.SamplingParams) and is what the sampler reads. Checks that need the model
(vocabulary size, context length) happen here (`check_params`, `resolve_max_tokens`).
"""

from __future__ import annotations

from ..protocol import ErrorKind, SamplingParams
from ..protocol.specs import MIN_TEMPERATURE

__all__ = [
    "MAX_TOP_LOGPROBS",
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "RequestError",
    "SamplingParams",
    "check_params",
    "resolve_max_tokens",
]


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


MIN_REPETITION_PENALTY = 1e-3  # smaller ones overflow the logits they multiply
MAX_TOP_LOGPROBS = 20


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Checks that need the model: token ids in `logit_bias` must exist (a map with more
    entries than the vocabulary has tokens is refused on its size alone)."""
    if params.prompt_logprobs is not None and not 0 <= params.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
    ids = params.logit_bias
    if len(ids) > vocab_size:
        # More entries than tokens: some are duplicates or not tokens at all.
        raise RequestError(
            f"logit_bias has {len(ids)} entries; this model's vocabulary has "
            f"{vocab_size} tokens, at most one entry each",
            param="logit_bias",
        )
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
