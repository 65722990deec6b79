"""Load a model and its tokenizer with mlx-lm, and describe it (context length, fingerprint).

Loading reports its progress (progress.py): the download (download.py), the quantisation
(quantize.py), the weights read one layer at a time, then the warm-up (tokenizer onwards;
the worker's main adds the constraint compiler and caches to it).

The fingerprint identifies exactly what produces the KV cache: weights, quantisation,
adapter, tokenizer and cache dtype. Cache slots are keyed by it, so a slot can never be
loaded into a different model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import ModelSpec
from ..protocol import LoadPhase
from .download import fetch
from .progress import NO_PROGRESS, ProgressSink
from .reasoning import ReasoningFormat, detect

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass(slots=True)
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any  # mlx_lm TokenizerWrapper
    path: Path
    context_length: int
    vocab_size: int  # width of the model's logits
    eos_ids: list[int]
    fingerprint: str
    load_seconds: float
    reasoning: ReasoningFormat | None = None  # the markers the model thinks between


def load(spec: ModelSpec, progress: ProgressSink = NO_PROGRESS, group: Any = None) -> LoadedModel:
    """Load `spec` (a local path, or a Hugging Face id: downloaded if missing). With an MLX
    distributed `group`, only this rank's shard of the weights is read."""
    import mlx.core as mx
    from mlx_lm.utils import load_adapters, load_model, load_tokenizer

    from .quantize import ensure_quantized, layer_groups

    started = time.monotonic()
    source = fetch(spec.source_path(), spec.revision, progress)
    tok_source = (
        fetch(spec.tokenizer_id_or_path, None, progress) if spec.tokenizer_id_or_path else None
    )
    path = source
    if spec.quant != "none":
        path = ensure_quantized(source, spec.quant, spec.quant_group_size, progress)
    progress.phase(LoadPhase.LOAD)
    model, config = load_model(path, lazy=True, model_config=spec.model_config_ or {})
    if group is not None:
        from .distributed import shard

        if spec.adapter_path:
            raise ValueError("adapters are not supported for a distributed model")
        assert spec.distributed is not None
        shard(model, group, spec.distributed.split)  # still lazy: nothing read yet
    groups = layer_groups(model)
    progress.phase(LoadPhase.LOAD, total=len(groups), unit="layers")
    for done, arrays in enumerate(groups, 1):
        mx.eval(arrays)  # reads this layer's weights
        progress.update(done)
    progress.phase(LoadPhase.WARMUP)
    if spec.adapter_path:
        model = load_adapters(model, str(spec.adapter_path))
        model.eval()
    tok_path = tok_source or path
    tokenizer = load_tokenizer(
        tok_path, spec.tokenizer_config or {}, eos_token_ids=config.get("eos_token_id")
    )
    if spec.chat_template:
        tokenizer._tokenizer.chat_template = spec.chat_template
    mx.eval(model.parameters())

    context = _context_length(config)
    if spec.context_length:
        context = min(context, spec.context_length) if context else spec.context_length
    vocab_size = _logits_width(model, config, tokenizer)
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        path=path,
        context_length=context or 4096,
        vocab_size=vocab_size,
        eos_ids=sorted(tokenizer.eos_token_ids),
        fingerprint=fingerprint(path, tok_path, spec),
        load_seconds=time.monotonic() - started,
        reasoning=detect(tokenizer, spec.reasoning_parser, spec.reasoning_tags),
    )


def _context_length(config: dict[str, Any]) -> int:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return 0


def _logits_width(model: Any, config: dict[str, Any], tokenizer: Any) -> int:
    for source in (config, config.get("text_config") or {}):
        value = source.get("vocab_size")
        if isinstance(value, int) and value > 0:
            return value
    return len(tokenizer)


def _file_digest(h: Any, path: Path) -> None:
    """Hash a file's name, size and (for big files) its first and last MiB: cheap for
    multi-GB weights, and any re-download or re-quantisation changes it."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= 4 << 20:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))


def fingerprint(model_path: Path, tokenizer_path: Path, spec: ModelSpec) -> str:
    h = hashlib.sha256()
    for p in sorted(model_path.glob("*.safetensors")) + [model_path / "config.json"]:
        if p.exists():
            _file_digest(h, p)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        p = Path(tokenizer_path) / name
        if p.exists():
            _file_digest(h, p)
    if spec.adapter_path:
        for p in sorted(Path(spec.adapter_path).glob("*")):
            if p.is_file():
                _file_digest(h, p)
    identity = {
        "quant": spec.quant,
        "quant_group_size": spec.quant_group_size,
        "model_config": spec.model_config_,
        "chat_template": spec.chat_template,
        "cache_dtype": "model",
    }
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
