"""The closed set of messages exchanged between gateway, supervisor and workers.

Every message is a typed msgspec Struct, and so are the records inside one (specs.py:
sampling parameters, constraint, model, engine settings); decoding refuses unknown or
mistyped fields at any depth. The dicts left are the client's own JSON (chat messages,
tools) passed through to the template, and free-form reports (heartbeat stats, control
replies). On the wire a message is two ZeroMQ frames: the message type (ascii) and a
msgpack map of its fields (see `codec.py`). Nothing here imports MLX, so the protocol is
unit-testable anywhere.

Flow of a generation:
    gateway --GENERATE--> supervisor --GENERATE--> worker
    worker --ACCEPTED--> (prompt facts, sent before prefill so streams can start)
    worker --OUTPUT-->  (one per engine step, holding the deltas of every request in it)
    worker --ERROR-->   (a request that failed; ends that request only)
    gateway --ABORT--> supervisor --ABORT--> worker   (idempotent, applied at the next step)

Worker lifecycle:
    worker --HELLO--> supervisor --CONFIG--> worker --READY--> supervisor
    worker --PROGRESS--> supervisor (between CONFIG and READY: download, quantise, load, warm-up)
    worker --HEARTBEAT--> supervisor (about once a second: load, memory, cache counters)

Operator control (status, evict, load, cache stats/clear, shutdown):
    gateway --CONTROL--> supervisor --CONTROL_REPLY--> gateway
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

import msgspec

from .errors import ErrorKind
from .specs import (
    EngineSettings,
    GuidedSpec,
    ModelLoad,
    ReasoningRequest,
    Record,
    SamplingParams,
)


class MsgType(StrEnum):
    """Every message type on the wire. Closed: decoding anything else is an error."""

    HELLO = "HELLO"
    CONFIG = "CONFIG"
    READY = "READY"
    PROGRESS = "PROGRESS"
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


class LoadPhase(StrEnum):
    """What a loading worker is doing. `starting` is the supervisor's own: the process is up
    but has not reported a phase yet (imports, handshake)."""

    STARTING = "starting"
    DOWNLOAD = "download"  # fetching files from the Hugging Face Hub
    QUANTIZE = "quantize"  # converting to the configured quant (once; the result is kept)
    LOAD = "load"  # reading the weights into memory
    WARMUP = "warmup"  # tokenizer, constraint compiler, caches: everything after the weights


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"
    ERROR = "error"


class Message(Record):
    TYPE: ClassVar[MsgType]


class Row(Message, array_like=True):
    """A record sent many times inside one OUTPUT (deltas, logprobs), never alone: an array
    of its field values, without the names, to keep per-step output small."""

    TYPE: ClassVar[MsgType] = MsgType.OUTPUT


# --- worker lifecycle -------------------------------------------------------------------


class Hello(Message):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    worker_id: str
    pid: int


class Config(Message):
    """The model a worker must load, and its engine settings (supervisor -> worker)."""

    TYPE: ClassVar[MsgType] = MsgType.CONFIG
    worker_id: str
    model: ModelLoad
    engine: EngineSettings


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
    reasoning: str = ""  # the reasoning format, e.g. "think(<think>,</think>)"; "" = none


class Progress(Message):
    """How far a loading worker has got (worker -> supervisor, between CONFIG and READY; at
    most a few per second, and one at each phase change). `done` and `total` count `unit`s
    ("bytes", "files", "layers"); both None where the worker cannot know how far it is."""

    TYPE: ClassVar[MsgType] = MsgType.PROGRESS
    worker_id: str
    phase: LoadPhase
    done: int | None = None
    total: int | None = None
    unit: str = ""


class Heartbeat(Message):
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    worker_id: str
    stats: dict[str, Any] = msgspec.field(default_factory=dict)


# --- generation ---------------------------------------------------------------------------


class Generate(Message):
    """One generation request for one prompt (a completions prompt list is split by the
    gateway into one Generate per prompt). `n` choices share one prefill.

    Exactly one of `messages` (chat), `prompt` (text) or `prompt_token_ids` is set.
    `messages`, `tools`, `tool_choice` and `chat_template_kwargs` are the client's JSON,
    passed through to the chat template."""

    TYPE: ClassVar[MsgType] = MsgType.GENERATE
    request_id: str
    model: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    chat_template_kwargs: dict[str, Any] | None = None
    n: int = 1
    parallel_tool_calls: bool = True
    stream: bool = False  # the client streams: tool-call arguments are sent incrementally
    guided: GuidedSpec | None = None
    cache_key: str | None = None  # OpenAI prompt_cache_key / user: keeps a session together
    # /tokenize and /detokenize: validate and tokenise (or decode `prompt_token_ids`), answer
    # with ACCEPTED carrying the result and a final delta, and generate nothing.
    tokenize_only: bool = False
    add_special_tokens: bool = True  # a text prompt's BOS and the like (vLLM's /tokenize switch)
    tokenizer_info: bool = False  # tokenize_only: ACCEPTED also carries the tokenizer's facts
    # Completions `echo`: ACCEPTED carries the prompt's text when it came as token ids.
    echo: bool = False
    reasoning: ReasoningRequest | None = None  # chat only: thinking switch, effort, cap


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


class LogprobEntry(Row):
    """One token's log-probability and its top alternatives. A prompt's first token has
    none (`logprob` None): nothing came before it."""

    token: str
    logprob: float | None
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = msgspec.field(default_factory=list)


class ToolCallFragment(Row):
    """One streamed piece of a tool call. The first piece of a call carries `id` and `name`;
    the `arguments` pieces of one `index` join to the call's arguments JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(Row):
    """What one choice of one request produced in one engine step."""

    request_id: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    tool_calls: list[ToolCallFragment] | None = None
    finish_reason: FinishReason | None = None
    # Set on the final delta of a choice.
    completion_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    # On a choice's first delta when the prompt is scored (`prompt_logprobs`): one entry
    # per prompt token.
    prompt_logprobs: list[LogprobEntry] | None = None
    # finish_reason "error": what failed, for the client's error event.
    error_kind: ErrorKind | None = None
    error_message: str | None = None
    # Reasoning models (appended last: older frames decode unchanged). `text` is the answer,
    # `reasoning` the thinking split off it; `reasoning_tokens` is set on the final delta.
    reasoning: str = ""
    reasoning_tokens: int = 0


class Output(Message):
    """All deltas of one engine step (one message per step, not per token)."""

    TYPE: ClassVar[MsgType] = MsgType.OUTPUT
    deltas: list[Delta]


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


class Abort(Message):
    TYPE: ClassVar[MsgType] = MsgType.ABORT
    request_id: str


# --- control ------------------------------------------------------------------------------


class Control(Message):
    TYPE: ClassVar[MsgType] = MsgType.CONTROL
    request_id: str
    op: ControlOp
    args: dict[str, Any] = msgspec.field(default_factory=dict)


class ControlReply(Message):
    TYPE: ClassVar[MsgType] = MsgType.CONTROL_REPLY
    request_id: str
    ok: bool
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    error: str | None = None


MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Config,
        Ready,
        Progress,
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
