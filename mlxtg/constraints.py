"""A request's output constraint, from its OpenAI / vLLM fields to a protocol GuidedSpec.

Pure and light (json only): the gateway turns `guided_json`, `response_format`,
`structured_outputs`, ... into the one GuidedSpec it sends; the worker compiles it
(worker/guided.py), raising the same GuidedError for what it cannot enforce.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from .protocol import ConstraintKind, GuidedSpec
from .schema_defaults import with_defaults

_SPEC_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")  # vLLM structured_outputs


class GuidedError(ValueError):
    """A constraint that cannot be compiled or enforced (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def load_schema(value: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as an object or as JSON text; GuidedError if it is neither."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise GuidedError(f"JSON schema is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise GuidedError("JSON schema must be a JSON object", param)
    return value


def _make_spec(kind: str, value: Any, param: str, close_objects: bool = True) -> GuidedSpec:
    if kind == "json":
        # Keys are not sorted: property order in the schema is the order the model writes.
        schema = with_defaults(load_schema(value, param), close_objects=close_objects)
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
        return GuidedSpec(ConstraintKind.JSON, text, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise GuidedError("choice must be a non-empty list of strings", param)
        return GuidedSpec(ConstraintKind.CHOICE, json.dumps(value, ensure_ascii=False), param)
    if kind == "json_object":
        return GuidedSpec(ConstraintKind.JSON_OBJECT, "", param)
    if not isinstance(value, str) or (kind == "grammar" and not value.strip()):
        raise GuidedError(f"{kind} must be a non-empty string", param)
    return GuidedSpec(ConstraintKind(kind), value, param)


def _candidates(body: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(param, kind, value) for every constraint the body sets."""
    out = [(n, n.removeprefix("guided_"), body[n]) for n in _SPEC_FIELDS if body.get(n) is not None]
    rf, p = body.get("response_format"), "response_format"
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        js = rf.get("json_schema") if kind == "json_schema" else {}
        if not isinstance(rf, dict) or not isinstance(js, dict):
            raise GuidedError("response_format (and its json_schema) must be an object", p)
        if kind == "json_object" or (kind == "json_schema" and js.get("schema") is None):
            out.append((p, "json_object", ""))  # OpenAI: json_schema.schema is optional
        elif kind == "json_schema":
            out.append((p, "json", js["schema"]))
        elif kind not in (None, "text"):
            raise GuidedError(f"unsupported response_format type {kind!r}", p)
    so, p = body.get("structured_outputs"), "structured_outputs"
    if so is not None:
        if not isinstance(so, dict):
            raise GuidedError("structured_outputs must be an object", p)
        if so.get("structural_tag") is not None:
            raise GuidedError("structured_outputs.structural_tag is not supported", p)
        keys = [k for k in _SO_KINDS if so.get(k) is not None and so[k] is not False]
        out += [(p, k, so[k]) for k in keys]
    return out


def spec_from_request(body: dict[str, Any]) -> GuidedSpec | None:
    """The one constraint an OpenAI/vLLM request body asks for, or None.

    Accepts guided_json / guided_regex / guided_choice / guided_grammar, response_format
    (json_object, json_schema, text), vLLM's structured_outputs and guided_whitespace_pattern.
    Fields set to null count as absent. JSON schemas get closed objects and 64-bit integers
    by default (schema_defaults.py). Raises GuidedError naming the field for conflicting
    or malformed constraints."""
    found = _candidates(body)
    if len(found) > 1:
        names = ", ".join(f"{p}.{k}" if p == "structured_outputs" else p for p, k, _ in found)
        raise GuidedError(f"only one output constraint may be given, got: {names}", found[1][0])
    so = body.get("structured_outputs") or {}
    ws = body.get("guided_whitespace_pattern", so.get("whitespace_pattern"))
    if ws is not None and not isinstance(ws, str):
        raise GuidedError("whitespace pattern must be a string", "guided_whitespace_pattern")
    if not found:
        return None
    close = not body.get("guided_allow_additional_properties")
    spec = _make_spec(found[0][1], found[0][2], found[0][0], close_objects=close)
    return msgspec.structs.replace(spec, whitespace_pattern=ws) if ws is not None else spec
