"""Server settings and the models.yaml file.

models.yaml is either a list of model entries (MLX-Textgen's format) or a mapping with a
`models:` list plus server-wide keys. Validation errors name the file, the entry and the
field, because that is what a person editing the file needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..models import ModelSpec, demo_spec


class ConfigError(ValueError):
    """models.yaml (or the flags) describe something that cannot be served."""


class ServerSettings(BaseModel):
    """Everything `mlxtg up` runs with (flags override the file's server keys)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = Field(default=5001, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)  # browser origins allowed; none: CORS off
    models: list[ModelSpec] = Field(default_factory=list)
    max_resident_models: int = Field(default=1, ge=1)
    # Gateway processes sharing the listening socket (and one supervisor): more HTTP, SSE and
    # validation throughput on a machine with cores to spare.
    gateways: int = Field(default=1, ge=1, le=64)
    memory_budget_gb: float | None = Field(default=None, gt=0)
    max_batch: int = Field(default=32, ge=1)
    max_queued: int = Field(default=128, ge=1)
    prefill_chunk: int = Field(default=512, ge=16)
    idle_prefill_chunk: int = Field(default=2048, ge=16)
    # Prompts finishing in one step share a padded forward pass; false: each alone (batch 1).
    batched_prefill: bool = True
    cache_ram_gb: float = Field(default=2.0, ge=0)
    cache_min_tokens: int = Field(default=16, ge=1)
    cache_disk_gb: float = Field(default=10.0, ge=0)
    cache_slots: int = Field(default=50, ge=0)
    load_timeout: float = Field(default=300.0, gt=0)
    fast_blas: bool = True
    # A started, idle worker process ready to take the next model (default: when several
    # models are configured), so a switch costs a weights load, not a Python start-up.
    standby_worker: bool | None = None
    # Reliability (issue 14). Extra Host header names accepted when listening on loopback
    # (DNS-rebinding guard); localhost, 127.0.0.1, [::1] and the bound host always are.
    allowed_hosts: list[str] = Field(default_factory=list)
    max_body_mb: float = Field(default=32.0, gt=0)  # larger request bodies get 413
    # One HTTP request may ask for at most this many sequences (prompts x n) and this many
    # sequences x max_tokens, so one call cannot hold the batch for minutes.
    max_request_sequences: int = Field(default=256, ge=1)
    max_request_tokens: int = Field(default=1 << 20, ge=1)
    # SIGTERM: in-flight requests may finish for this long; the rest are cut with an error.
    drain_timeout: float = Field(default=30.0, ge=0)
    # Watchdog: a worker whose engine step runs longer than stall_timeout, or that sends no
    # heartbeat for heartbeat_timeout, is failed, killed and respawned.
    stall_timeout: float = Field(default=120.0, gt=0)
    heartbeat_timeout: float = Field(default=15.0, gt=0)

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def find(self, name: str) -> ModelSpec | None:
        for spec in self.models:
            if spec.name == name:
                return spec
        return None

    def check(self) -> None:
        names = self.model_names()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"duplicate model_name {dupes[0]!r}: every model needs its own name")
        if not self.models:
            raise ConfigError("no models to serve")
        for spec in self.models:
            if spec.distributed is not None:
                try:
                    spec.distributed.check_here()
                except ValueError as exc:
                    raise ConfigError(f"model {spec.name!r}: distributed: {exc}") from None


def load_models_file(path: Path) -> dict[str, Any]:
    """Parse models.yaml into ServerSettings keyword arguments, with precise errors."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if isinstance(raw, list):
        raw = {"models": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise ConfigError(f"{path}: expected a list of models or a mapping with a 'models' list")
    specs: list[ModelSpec] = []
    for i, entry in enumerate(raw["models"]):
        label = f"{path}: models[{i}]"
        if isinstance(entry, dict) and entry.get("model_name"):
            label += f" ({entry['model_name']})"
        dist = entry.get("distributed") if isinstance(entry, dict) else None
        if isinstance(dist, dict) and isinstance(dist.get("hostfile"), str):
            # Relative to models.yaml, like model paths (a service's cwd is not the file's).
            hostfile = Path(dist["hostfile"]).expanduser()
            entry = {**entry, "distributed": {**dist, "hostfile": str(path.parent / hostfile)}}
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "entry"
            raise ConfigError(f"{label}: field '{where}': {err['msg']}") from None
        _check_paths(spec, label, path.parent)
        if any(other.name == spec.name for other in specs):
            raise ConfigError(f"{label}: field 'model_name': duplicate model_name {spec.name!r}")
        specs.append(spec)
    out = {k: v for k, v in raw.items() if k != "models"}
    out["models"] = specs
    return out


def _check_paths(spec: ModelSpec, label: str, base: Path) -> None:
    """Local paths must exist (relative ones are taken from the file's folder)."""
    for field_name in ("model_id_or_path", "tokenizer_id_or_path", "adapter_path"):
        value = getattr(spec, field_name)
        if not value:
            continue
        looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            candidate = (base / candidate).resolve()
        if candidate.exists():
            setattr(spec, field_name, str(candidate))
        elif looks_local or field_name == "adapter_path":
            raise ConfigError(f"{label}: field '{field_name}': path {value!r} does not exist")


def build_settings(
    config_file: Path | None, model: str | None, overrides: dict[str, Any]
) -> ServerSettings:
    """Combine models.yaml, `--model` and flags; no config and no model = the demo model."""
    data: dict[str, Any] = load_models_file(config_file) if config_file else {}
    if model:
        spec = ModelSpec(model_id_or_path=model)
        _check_paths(spec, f"--model {model}", Path.cwd())
        data["models"] = [spec, *data.get("models", [])]
    if not data.get("models"):
        data["models"] = [demo_spec()]
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = ServerSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        source = f"{config_file}: " if config_file else ""
        raise ConfigError(f"{source}setting '{where}': {err['msg']}") from None
    settings.check()
    return settings
