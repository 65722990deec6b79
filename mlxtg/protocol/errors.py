"""The one vocabulary of failures that crosses process boundaries.

Workers and the supervisor say *what* failed with an `ErrorKind`; each API surface of the
gateway maps a kind to its own HTTP status and body, once (gateway/errors.py)."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    INVALID_REQUEST = "invalid_request"  # the request cannot be served as asked (400)
    CONTEXT_OVERFLOW = "context_overflow"  # prompt + completion exceed the context (400)
    MODEL_NOT_FOUND = "model_not_found"  # no configured model has that name (404)
    QUEUE_FULL = "queue_full"  # too many requests waiting; retry after a while (429)
    # No worker can serve it now: the worker died, the model failed or timed out loading,
    # the gateway is shutting down (503).
    UNAVAILABLE = "unavailable"
    # It failed part way through generating (e.g. the constraint rejected a token) (500).
    GENERATION_FAILED = "generation_failed"
    INTERNAL = "internal"  # a bug (500)
