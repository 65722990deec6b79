"""Quantisation levels a model can be served at (models.yaml `quant`), and their bits.

Neutral ground: the supervisor sizes resident models with it, the worker converts with it."""

from __future__ import annotations

from typing import Literal

Quant = Literal["none", "q8", "q6", "q4", "q3", "q2"]

BITS: dict[str, int] = {"q8": 8, "q6": 6, "q4": 4, "q3": 3, "q2": 2}
