"""The closed set of messages exchanged between gateway, supervisor and workers.

Every message is a slotted dataclass. On the wire it is two ZeroMQ frames: the message
type (ascii) and a msgpack map of its fields (see `codec.py`). Nothing here imports MLX,
so the protocol is unit-testable anywhere.

Flow of a generation:
    gateway --GENERATE--> supervisor --GENERATE--> worker
    worker --ACCEPTED--> (prompt facts, sent before prefill so streams can start)
    worker --OUTPUT-->  (one per engine step, holding the deltas of every request in it)
    worker --ERROR-->   (a request that failed; ends that request only)
    gateway --ABORT--> supervisor --ABORT--> worker   (idempotent, applied at the next step)

Worker lifecycle:
    worker --HELLO--> supervisor --CONFIG--> worker --READY--> supervisor
    worker --HEARTBEAT--> supervisor (about once a second: load, memory, cache counters)

Operator control (status, evict, load, cache stats/clear, shutdown):
    gateway --CONTROL--> supervisor --CONTROL_REPLY--> gateway
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from .errors import ErrorKind


class MsgType(StrEnum):
    """Every message type on the wire. Closed: decoding anything else is an error."""

    HELLO = "HELLO"
    CONFIG = "CONFIG"
    READY = "READY"
    HEARTBEAT = "HEARTBEAT"
    GENERATE = "GENERATE"
    ACCEPTED = "ACCEPTED"
    OUTPUT = "OUTPUT"
    ERROR = "ERROR"
    ABORT = "ABORT"
    CONTROL = "CONTROL"
    CONTROL_REPLY = "CONTROL_REPLY"


class ControlOp(StrEnum):
    """Operator actions the supervisor understands (an explicit enum, not method names)."""

    STATUS = "status"
    EVICT = "evict"
    LOAD = "load"
    CACHE_STATS = "cache_stats"
    CACHE_CLEAR = "cache_clear"
    SHUTDOWN = "shutdown"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True)
class Message:
    TYPE: ClassVar[MsgType]
    # Fields holding nested messages: name -> (class, is_list). Used by the codec.
    NESTED: ClassVar[dict[str, tuple[type, bool]]] = {}


# --- worker lifecycle -------------------------------------------------------------------


@dataclass(slots=True)
class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    worker_id: str
    pid: int


@dataclass(slots=True)
class Config(Message):
    """The model a worker must load, and its engine settings (supervisor -> worker)."""

    TYPE: ClassVar[MsgType] = MsgType.CONFIG
    worker_id: str
    model: dict[str, Any]  # a serialised ModelSpec (supervisor/config.py)
    engine: dict[str, Any]  # a serialised EngineSettings (worker/settings.py)


@dataclass(slots=True)
class Ready(Message):
    """The worker's facts once the model is loaded; `error` set when loading failed."""

    TYPE: ClassVar[MsgType] = MsgType.READY
    worker_id: str
    model: str
    context_length: int = 0
    fingerprint: str = ""
    vocab_size: int = 0
    blas: str = ""
    load_seconds: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class Heartbeat(Message):
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    worker_id: str
    stats: dict[str, Any] = field(default_factory=dict)


# --- generation ---------------------------------------------------------------------------


@dataclass(slots=True)
class Generate(Message):
    """One generation request for one prompt (a completions prompt list is split by the
    gateway into one Generate per prompt). `n` choices share one prefill.

    Exactly one of `messages` (chat), `prompt` (text) or `prompt_token_ids` is set.
    `params` is a serialised SamplingParams (worker/params.py)."""

    TYPE: ClassVar[MsgType] = MsgType.GENERATE
    request_id: str
    model: str
    params: dict[str, Any]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    n: int = 1
    parallel_tool_calls: bool = True
    stream: bool = False  # the client streams: tool-call arguments are sent incrementally
    guided: dict[str, Any] | None = None  # a serialised GuidedSpec
    cache_key: str | None = None  # OpenAI prompt_cache_key / user: keeps a session together
    # /tokenize and /detokenize: validate and tokenise (or decode `prompt_token_ids`), answer
    # with ACCEPTED carrying the result and a final delta, and generate nothing.
    tokenize_only: bool = False
    add_special_tokens: bool = True  # a text prompt's BOS and the like (vLLM's /tokenize switch)
    tokenizer_info: bool = False  # tokenize_only: ACCEPTED also carries the tokenizer's facts
    # Completions `echo`: ACCEPTED carries the prompt's text when it came as token ids.
    echo: bool = False


@dataclass(slots=True)
class Accepted(Message):
    """Sent once a request is validated and queued, before prefill starts."""

    TYPE: ClassVar[MsgType] = MsgType.ACCEPTED
    request_id: str
    prompt_tokens: int
    cached_tokens: int = 0
    cache_source: str = "none"  # "ram" | "disk" | "none"
    cache_miss_reason: str | None = None
    # Set only in answer to a tokenize_only GENERATE (`prompt_text` also for `echo`).
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    max_model_len: int | None = None
    tokenizer_info: dict[str, Any] | None = (
        None  # special tokens, chat template (GET /tokenizer_info)
    )


@dataclass(slots=True)
class LogprobEntry(Message):
    """One token's log-probability and its top alternatives. A prompt's first token has
    none (`logprob` None): nothing came before it."""

    TYPE: ClassVar[MsgType] = MsgType.OUTPUT  # never sent alone
    token: str
    logprob: float | None
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass(slots=True)
class Delta(Message):
    """What one choice of one request produced in one engine step."""

    TYPE: ClassVar[MsgType] = MsgType.OUTPUT  # never sent alone
    NESTED: ClassVar[dict[str, tuple[type, bool]]] = {
        "logprobs": (LogprobEntry, True),
        "prompt_logprobs": (LogprobEntry, True),
    }
    request_id: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    # Set on the final delta of a choice.
    completion_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    # On a choice's first delta when the prompt is scored (`prompt_logprobs`): one entry
    # per prompt token.
    prompt_logprobs: list[LogprobEntry] | None = None
    # finish_reason "error": what failed, for the client's error event.
    error_kind: ErrorKind | None = None
    error_message: str | None = None


@dataclass(slots=True)
class Output(Message):
    """All deltas of one engine step (one message per step, not per token)."""

    TYPE: ClassVar[MsgType] = MsgType.OUTPUT
    NESTED: ClassVar[dict[str, tuple[type, bool]]] = {"deltas": (Delta, True)}
    deltas: list[Delta]


@dataclass(slots=True)
class Error(Message):
    """A failed request, ending that request only. The gateway turns `kind` into each API's
    status and body; `code` overrides the kind's default machine-readable code."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    request_id: str
    kind: ErrorKind
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float | None = None


@dataclass(slots=True)
class Abort(Message):
    TYPE: ClassVar[MsgType] = MsgType.ABORT
    request_id: str


# --- control ------------------------------------------------------------------------------


@dataclass(slots=True)
class Control(Message):
    TYPE: ClassVar[MsgType] = MsgType.CONTROL
    request_id: str
    op: str  # a ControlOp value
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ControlReply(Message):
    TYPE: ClassVar[MsgType] = MsgType.CONTROL_REPLY
    request_id: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Config,
        Ready,
        Heartbeat,
        Generate,
        Accepted,
        Output,
        Error,
        Abort,
        Control,
        ControlReply,
    )
}
