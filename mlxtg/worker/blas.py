"""Which BLAS the MLX CPU backend uses, and where a fast one is.

The `mlx[cpu]` wheel on Linux ships a reference BLAS (about 3.7 GFLOP/s for a 1024²
matmul here); Debian's OpenBLAS preloaded gives about 135. The supervisor starts
workers with `LD_PRELOAD` set to the first library found here unless told not to.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def find_fast_blas() -> str | None:
    """Path of an OpenBLAS to preload on Linux, or None (macOS uses Accelerate/Metal)."""
    if not sys.platform.startswith("linux"):
        return None
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


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
