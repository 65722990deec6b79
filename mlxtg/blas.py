"""Where a fast BLAS is for the MLX CPU backend on Linux.

The `mlx[cpu]` wheel on Linux ships a reference BLAS (about 3.7 GFLOP/s for a 1024²
matmul here); Debian's OpenBLAS preloaded gives about 135. The supervisor starts
workers with `LD_PRELOAD` set to the first library found here unless told not to; the
worker reports what it loaded (worker/blas.py).
"""

from __future__ import annotations

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
