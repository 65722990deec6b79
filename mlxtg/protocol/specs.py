"""Typed records carried inside messages: what to sample, what to constrain, what to load
and how to run. Decoding checks every field's type and refuses unknown fields, here as in
the messages; checks that need the model (vocabulary, context) stay in the worker."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec

from ..quant import Quant


class Record(msgspec.Struct, forbid_unknown_fields=True):
    """Base of everything on the wire: a field the receiver does not know is an error."""


MIN_TEMPERATURE = 1e-3


class SamplingParams(Record):
    """Per-request sampling, as the gateway validated it and the sampler reads it."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
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


class ConstraintKind(StrEnum):
    JSON = "json"  # value: the schema as JSON text
    JSON_OBJECT = "json_object"  # value: ""
    REGEX = "regex"  # value: the pattern
    CHOICE = "choice"  # value: a JSON list of strings
    GRAMMAR = "grammar"  # value: Lark or GBNF text


class GuidedSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One output constraint (hashable: compiled constraints are cached by it). `param`
    names the request field it came from, for error messages."""

    kind: ConstraintKind
    value: str
    param: str = "guided_json"
    whitespace_pattern: str | None = None  # None = compact JSON (no free whitespace)

    def __post_init__(self) -> None:
        # Decoding checks types already; this catches a record built by hand.
        if self.kind not in _KINDS or not isinstance(self.value, str):
            raise ValueError(f"bad constraint kind {self.kind!r} or value type")


_KINDS = frozenset(ConstraintKind)


class ReasoningEffort(StrEnum):
    """How hard a reasoning model should think (OpenAI's levels and Anthropic's)."""

    NONE = "none"
    MINIMAL = "minimal"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    XHIGH = "xhigh"
    MAX = "max"


class ReasoningRequest(Record):
    """What a request asks of a reasoning model's thinking (chat-template requests only)."""

    enabled: bool | None = None  # None: the template's default; else its thinking switch
    effort: ReasoningEffort | None = None
    max_tokens: int | None = None  # >= 0: reasoning tokens before the end marker is forced


class EngineSettings(Record):
    """A worker's engine settings (in its CONFIG)."""

    max_batch: int = 32  # sequences decoded together
    max_queued: int = 128  # requests waiting for prefill before 429
    prefill_chunk: int = 512  # prompt tokens per step, so long prompts never stall streams
    idle_prefill_chunk: int = 2048  # the budget when nothing runs: no stream to stall
    batched_prefill: bool = True  # False: every prompt alone at batch 1 (batch-invariant)
    cache_ram_bytes: int = 2 << 30  # hot prefix cache budget
    cache_min_tokens: int = 16  # shorter matches are not worth reusing
    cache_disk_bytes: int = 10 << 30  # disk tier budget; 0 disables it
    cache_slots: int = 50  # conversations kept on disk
    cache_block_tokens: int = 128  # disk blocks: a request reads only its prefix's blocks
    cache_dir: str = ""  # default: $MLXTG_HOME/kv-cache
    heartbeat_s: float = 1.0


class RankHost(Record):
    """Where one rank of a distributed model runs: the ssh name to start it by, and the IP
    its ring connections use (`mlx.launch`'s hostfile entry, one IP)."""

    ssh: str
    ip: str


class DistributedLoad(Record):
    """A model sharded across processes with MLX's distributed runtime (models.yaml
    `distributed:`). Rank 0 runs on this machine, the others in host order."""

    hosts: list[RankHost]
    backend: str = "ring"
    split: str = "tensor"  # tensor | pipeline
    python: str | None = None  # the interpreter on the other hosts; default: this one's
    port: int = 0  # the first ring port (one per rank after it); 0 = free local ports


class ModelLoad(Record):
    """The model a worker loads (in its CONFIG): one models.yaml entry, whose pydantic twin
    (`mlxtg.models.ModelSpec`) validates the YAML and converts to and from this record."""

    model_id_or_path: str
    model_name: str | None = None
    tokenizer_id_or_path: str | None = None
    adapter_path: str | None = None
    quant: Quant = "none"
    quant_group_size: int = 64
    revision: str | None = None
    model_config_: dict[str, Any] | None = msgspec.field(default=None, name="model_config")
    tokenizer_config: dict[str, Any] | None = None
    context_length: int | None = None
    tool_parser: str | None = None
    chat_template: str | None = None
    reasoning_parser: str = "auto"  # auto | none | think | harmony
    reasoning_tags: tuple[str, str] | None = None  # [start, end] markers, overriding detection
    pinned: bool = False
    idle_timeout: float | None = None
    cache_ram_gb: float | None = None
    cache_disk_gb: float | None = None
    cache_slots: int | None = None
    cache_min_tokens: int | None = None
    distributed: DistributedLoad | None = None
