"""Which BLAS this worker process actually uses (for its start-up log line and READY)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..blas import OPENBLAS_CANDIDATES


def describe_blas() -> str:
    """What this process actually loaded, for the startup log line."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    try:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    except OSError:
        return "unknown"
    # Look for the preloaded system library itself: numpy maps an OpenBLAS of its own
    # (numpy.libs/libscipy_openblas...), which MLX does not use.
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    for lib in preloaded + list(OPENBLAS_CANDIDATES):
        real = os.path.realpath(lib)
        if "openblas" in real.lower() and (lib in maps or real in maps):
            return f"OpenBLAS ({lib})"
    return "reference BLAS bundled with mlx[cpu] (slow; install libopenblas0-pthread)"
