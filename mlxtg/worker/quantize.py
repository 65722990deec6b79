"""Quantisation at start-up: convert once with mlx-lm, keep the result, reuse it.

The converted model lives under `$MLXTG_HOME/models/`, keyed by a fingerprint of the
source files and the settings, so a changed source (or other settings) converts anew and
an unchanged one loads straight from disk.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from .. import paths
from ..quant import BITS

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


def ensure_quantized(src: Path, quant: str, group_size: int) -> Path:
    """The folder of `src` quantised to `quant`, converting it first if needed."""
    if quant not in BITS:
        raise ValueError(f"unknown quant {quant!r}: use one of none, {', '.join(BITS)}")
    target = quantized_path(src, quant, group_size)
    if (target / "config.json").exists():
        log.info("using quantised model %s", target)
        return target
    from mlx_lm.convert import convert

    tmp = target.with_name(target.name + f".tmp-{int(time.time() * 1000)}")
    log.info("quantising %s to %s (group size %d) into %s ...", src, quant, group_size, target)
    started = time.monotonic()
    try:
        convert(
            str(src), mlx_path=str(tmp), quantize=True, q_bits=BITS[quant], q_group_size=group_size
        )
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
