"""Quantisation at start-up: convert once with mlx-lm, keep the result, reuse it.

The converted model lives under `$MLXTG_HOME/models/`, keyed by a fingerprint of the
source files and the settings, so a changed source (or other settings) converts anew and
an unchanged one loads straight from disk.

The conversion is mlx-lm's `convert` step by step (load lazily, cast, quantise, save), with
the quantised weights evaluated one layer at a time before saving, so progress is reported
in layers: the embeddings, final norm and head count as one more.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .. import paths
from ..protocol import LoadPhase
from ..quant import BITS
from .progress import NO_PROGRESS, ProgressSink

log = logging.getLogger("mlxtg.worker")


def source_digest(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(src.glob("*.safetensors")) + [src / "config.json"]:
        if p.exists():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def quantized_path(src: Path, quant: str, group_size: int) -> Path:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.name)
    return paths.models_dir() / f"{name}-{source_digest(src)}-{quant}-g{group_size}"


def ensure_quantized(
    src: Path, quant: str, group_size: int, progress: ProgressSink = NO_PROGRESS
) -> Path:
    """The folder of `src` quantised to `quant`, converting it first if needed."""
    if quant not in BITS:
        raise ValueError(f"unknown quant {quant!r}: use one of none, {', '.join(BITS)}")
    target = quantized_path(src, quant, group_size)
    if (target / "config.json").exists():
        log.info("using quantised model %s", target)
        return target
    # The pid too: the ranks of a distributed model on one machine convert at the same time.
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}-{int(time.time() * 1000)}")
    log.info("quantising %s to %s (group size %d) into %s ...", src, quant, group_size, target)
    started = time.monotonic()
    try:
        convert(src, tmp, BITS[quant], group_size, progress)
        tmp.rename(target)  # atomic: a half-written conversion is never loaded
    except FileExistsError:
        pass  # another worker finished the same conversion first
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("quantised in %.1fs", time.monotonic() - started)
    return target


_CONVERSION_DTYPES = ("float16", "bfloat16", "float32")  # mlx-lm convert's


def convert(src: Path, dst: Path, bits: int, group_size: int, progress: ProgressSink) -> None:
    """mlx_lm.convert.convert(src, dst, quantize=True, ...) with progress in layers."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load, quantize_model, save

    progress.phase(LoadPhase.QUANTIZE)
    loaded: Any = load(str(src), return_config=True, lazy=True)
    model, tokenizer, config = loaded
    dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    if dtype in _CONVERSION_DTYPES:
        target = getattr(mx, dtype)
        cast = getattr(model, "cast_predicate", lambda _: True)

        def set_dtype(key: str, value: Any) -> Any:
            floating = mx.issubdtype(value.dtype, mx.floating)
            return value.astype(target) if cast(key) and floating else value

        model.update(tree_map_with_path(set_dtype, model.parameters()))
    model, config = quantize_model(model, config, group_size, bits)
    groups = layer_groups(model)
    progress.phase(LoadPhase.QUANTIZE, total=len(groups), unit="layers")
    for done, arrays in enumerate(groups, 1):
        mx.eval(arrays)  # quantises this layer (reading its source weights)
        progress.update(done)
    save(dst, str(src), model, tokenizer, config)


_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def layer_groups(model: Any) -> list[list[Any]]:
    """The model's parameters grouped by transformer layer, in order; everything outside
    the layers (embeddings, final norm, head) is one more group."""
    from mlx.utils import tree_flatten

    groups: dict[str, list[Any]] = {}
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for name, value in flat:
        match = _LAYER.match(name)
        groups.setdefault(match.group(1) if match else "", []).append(value)
    return list(groups.values())
