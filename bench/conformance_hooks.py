"""Schemathesis hooks for `make conformance` (loaded through SCHEMATHESIS_HOOKS).

Generated bodies name the served model (random names would only test the 404 path) and
ask for few tokens, so that thousands of cases finish in minutes on a CPU; every other field
stays as schemathesis generates it, valid or not.
"""

from __future__ import annotations

from typing import Any

import schemathesis

MODEL = "mlxtg-demo"
_TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    if isinstance(body, dict):
        if "model" in body:
            body["model"] = MODEL
        for key in _TOKEN_LIMITS:
            if isinstance(body.get(key), int) and body[key] > 8:
                body[key] = 8
        if isinstance(body.get("n"), int) and body["n"] > 4:
            body["n"] = 4
    return body
