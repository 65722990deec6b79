"""What a served model is (`ModelSpec`) and where its files come from.

Only configured models are ever loaded: a request's `model` field is looked up among
the configured names and never triggers a download or a path lookup.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .hosts import is_local
from .protocol import ModelLoad
from .protocol.specs import DistributedLoad
from .quant import Quant

DEMO_MODEL_PATH = Path(__file__).parent / "demo" / "model"
DEMO_MODEL_NAME = "mlxtg-demo"


class ModelNotAvailable(RuntimeError):
    """The model's files are neither on disk nor in the Hugging Face cache (offline)."""


class RankHostSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ssh: str  # how to reach the host (`ssh NAME` must work without a password)
    ip: str  # the address its ring connections use (Thunderbolt bridge, Ethernet, Wi-Fi)


class DistributedSpec(BaseModel):
    """models.yaml `distributed:`: one model sharded across processes (issue 13).

    `hosts` lists one rank per entry, in rank order: an IP (ssh to the same address) or
    `{ssh: NAME, ip: IP}`; the first is this machine. `hostfile` names `mlx.launch`'s JSON
    hostfile instead (`{"hosts": [{"ssh": ..., "ips": [...]}]}`)."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[RankHostSpec | str] = Field(default_factory=list)
    hostfile: Path | None = None
    backend: Literal["ring"] = "ring"
    split: Literal["tensor", "pipeline"] = "tensor"
    python: str | None = None  # the interpreter on the other hosts; default: this one's path
    port: int = Field(default=0, ge=0, le=65535)  # first ring port; 0 = free local ports

    @model_validator(mode="after")
    def _resolve_hosts(self) -> DistributedSpec:
        """Structure only: where rank 0 runs is checked by the supervisor (`check_here`),
        since every rank rebuilds this spec from the wire on its own host."""
        if self.hostfile is not None:
            if self.hosts:
                raise ValueError("give either hosts or hostfile, not both")
            self.hosts = list(_read_hostfile(self.hostfile.expanduser()))
            self.hostfile = None
        self.hosts = [RankHostSpec(ssh=h, ip=h) if isinstance(h, str) else h for h in self.hosts]
        if len(self.hosts) < 2:
            raise ValueError("a distributed model needs at least 2 hosts (one per rank)")
        for h in self.hosts:
            ip = h.ip if isinstance(h, RankHostSpec) else h
            try:
                if ipaddress.ip_address(ip).version != 4:
                    raise ValueError(f"host {ip}: the ring backend takes IPv4 addresses")
            except ValueError as exc:
                raise ValueError(f"host {ip!r}: {exc}") from None
        if self.port and self.port + len(self.hosts) - 1 > 65535:
            raise ValueError(f"ports {self.port}..{self.port + len(self.hosts) - 1} exceed 65535")
        return self

    def check_here(self) -> None:
        """What only the machine that runs rank 0 can check (raises ValueError)."""
        hosts = [h for h in self.hosts if isinstance(h, RankHostSpec)]
        if not is_local(hosts[0].ip):
            raise ValueError(f"the first host runs rank 0 and must be this machine: {hosts[0].ip}")
        if not self.port and not all(is_local(h.ip) and is_local(h.ssh) for h in hosts):
            raise ValueError("set distributed.port (the first ring port) when ranks run elsewhere")

    def to_wire(self) -> DistributedLoad:
        return msgspec.convert(self.model_dump(exclude={"hostfile"}), DistributedLoad)


def _read_hostfile(path: Path) -> list[RankHostSpec]:
    """mlx.launch's hostfile: `{"hosts": [{"ssh": NAME, "ips": [IP, ...]}, ...]}` (or the
    bare list); each host's first IP carries its ring connection."""
    try:
        data = json.loads(path.read_text())
        entries = data.get("hosts", data) if isinstance(data, dict) else data
        return [RankHostSpec(ssh=str(h["ssh"]), ip=str(h["ips"][0])) for h in entries]
    except OSError as exc:
        raise ValueError(f"hostfile {path}: cannot read ({exc.strerror})") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(
            f'hostfile {path}: expected {{"hosts": [{{"ssh": NAME, "ips": [IP]}}, ...]}} ({exc!r})'
        ) from None


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
    distributed: DistributedSpec | None = None

    @property
    def name(self) -> str:
        if self.model_name:
            return self.model_name
        return Path(self.model_id_or_path.rstrip("/")).name or self.model_id_or_path

    def source_path(self) -> str:
        return self.model_id_or_path

    def to_wire(self) -> ModelLoad:
        fields = self.model_dump(exclude={"distributed"})
        distributed = self.distributed.to_wire() if self.distributed else None
        return ModelLoad(**fields, distributed=distributed)

    @classmethod
    def from_wire(cls, load: ModelLoad) -> ModelSpec:
        return cls.model_validate(msgspec.to_builtins(load))


def demo_spec() -> ModelSpec:
    return ModelSpec(model_id_or_path=str(DEMO_MODEL_PATH), model_name=DEMO_MODEL_NAME)


# What a model folder needs from the Hub (weights, configs, tokenizer, template, code).
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


def looks_like_hub_id(id_or_path: str) -> bool:
    """`owner/name` that does not read as a local path."""
    return not id_or_path.startswith((".", "/", "~")) and id_or_path.count("/") == 1


def resolve_model_path(id_or_path: str, revision: str | None = None) -> Path:
    """A local folder for a local path or a Hugging Face id.

    Hugging Face ids are downloaded (with a progress bar) when online, read from the
    local cache offline, and otherwise fail with one clear line."""
    local = Path(id_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelNotAvailable(f"{local} has no config.json: not a model folder")
        return local.resolve()
    if not looks_like_hub_id(id_or_path):
        raise ModelNotAvailable(f"model path {id_or_path!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(id_or_path, revision=revision, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        try:
            return Path(
                snapshot_download(
                    id_or_path,
                    revision=revision,
                    allow_patterns=HUB_PATTERNS,
                    local_files_only=True,
                )
            )
        except (LocalEntryNotFoundError, OSError):
            raise ModelNotAvailable(
                f"model {id_or_path!r} is not in the local Hugging Face cache and could not be "
                f"downloaded ({type(exc).__name__})"
            ) from None
