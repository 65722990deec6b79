"""What a served model is (`ModelSpec`) and where its files come from.

Only configured models are ever loaded: a request's `model` field is looked up among
the configured names and never triggers a download or a path lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from .protocol import ModelLoad
from .quant import Quant

DEMO_MODEL_PATH = Path(__file__).parent / "demo" / "model"
DEMO_MODEL_NAME = "mlxtg-demo"


class ModelNotAvailable(RuntimeError):
    """The model's files are neither on disk nor in the Hugging Face cache (offline)."""


class ModelSpec(BaseModel):
    """One entry of models.yaml (the MLX-Textgen fields plus ours); on the wire it is a
    protocol ModelLoad with the same fields."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    model_id_or_path: str
    model_name: str | None = None
    tokenizer_id_or_path: str | None = None
    adapter_path: str | None = None
    quant: Quant = "none"
    quant_group_size: int = 64
    revision: str | None = None
    model_config_: dict[str, Any] | None = Field(default=None, alias="model_config")
    tokenizer_config: dict[str, Any] | None = None
    context_length: int | None = Field(default=None, gt=0)
    tool_parser: str | None = None
    chat_template: str | None = None
    reasoning_parser: Literal["auto", "none", "think", "harmony"] = "auto"
    reasoning_tags: tuple[str, str] | None = None  # [start, end], overriding detection
    pinned: bool = False
    idle_timeout: float | None = Field(default=None, gt=0)
    cache_ram_gb: float | None = Field(default=None, ge=0)
    cache_disk_gb: float | None = Field(default=None, ge=0)
    cache_slots: int | None = Field(default=None, ge=0)
    cache_min_tokens: int | None = Field(default=None, ge=0)

    @property
    def name(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.model_id_or_path.rstrip("/")).name or self.model_id_or_path

    def source_path(self) -> str:
        return self.model_id_or_path

    def to_wire(self) -> ModelLoad:
        return ModelLoad(**self.model_dump())

    @classmethod
    def from_wire(cls, load: ModelLoad) -> ModelSpec:
        return cls.model_validate(msgspec.structs.asdict(load))


def demo_spec() -> ModelSpec:
    return ModelSpec(model_id_or_path=str(DEMO_MODEL_PATH), model_name=DEMO_MODEL_NAME)


def resolve_model_path(id_or_path: str, revision: str | None = None) -> Path:
    """A local folder for a local path or a Hugging Face id.

    Hugging Face ids are downloaded (with a progress bar) when online, read from the
    local cache offline, and otherwise fail with one clear line."""
    local = Path(id_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelNotAvailable(f"{local} has no config.json: not a model folder")
        return local.resolve()
    if id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") != 1:
        raise ModelNotAvailable(f"model path {id_or_path!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "*.json",
        "*.safetensors",
        "*.py",
        "tokenizer.model",
        "*.tiktoken",
        "*.txt",
        "*.jinja",
    ]
    try:
        return Path(snapshot_download(id_or_path, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        try:
            return Path(
                snapshot_download(
                    id_or_path, revision=revision, allow_patterns=patterns, local_files_only=True
                )
            )
        except (LocalEntryNotFoundError, OSError):
            raise ModelNotAvailable(
                f"model {id_or_path!r} is not in the local Hugging Face cache and could not be "
                f"downloaded ({type(exc).__name__})"
            ) from None
