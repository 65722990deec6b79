"""Grammars that constrain tool calls: forced (tool_choice "required" or a named function)
or lazy (tool_choice "auto": free text until the model opens a call).

`tool_call_grammar` returns an llguidance Lark grammar producing exactly the text the
matching parser in `mlxtg.worker.tool_calls` reads as calls, e.g. for Hermes/Qwen:

    <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\\n</tool_call>

Each call's arguments are constrained by that tool's `parameters` schema (llguidance's
inline `%json`), with fixed separators ", " and ": " and no other whitespace: that is how
chat templates render past calls, and it leaves the model no way to pad with whitespace.

Tags that the tokenizer has as added tokens (Qwen's `<tool_call>`, Mistral's `[TOOL_CALLS]`)
must be given in `added_tokens` (`tokenizer.get_added_vocab()`): llguidance treats every
added token as special, and a quoted literal spelling one is masked to that token and then
rejected when consumed (llguidance 1.9), so such tags are written as `<[id]>` instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["any_strict", "forces_call", "tool_call_grammar", "validate_tools"]

# OpenAI allows [a-zA-Z0-9_-]{1,64}; "." and ":" are accepted too, as MCP-style clients use
# them. The restriction also keeps names free of anything needing escapes in JSON or Lark.
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_JSON_STYLE: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    # Ignore schema keywords llguidance does not implement rather than refuse the request.
    "lenient": True,
}
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def validate_tools(tools: Any) -> None:
    """Raise ValueError, naming the offending entry, unless `tools` is a list of
    {"type": "function", "function": {"name": str, "parameters"?: object, ...}} with
    distinct, well-formed names and object-typed parameter schemas."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f'{where} must be an object with "type": "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"{where}.function.name must be 1-64 characters of letters, digits, "
                f"'_', '-', '.' or ':' (got {name!r})"
            )
        if name in seen:
            raise ValueError(f"{where}.function.name {name!r} is used by more than one tool")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ValueError(
                f'{where}.function.parameters must describe an object ("type": "object"), '
                f"got type {params.get('type')!r}"
            )


def forces_call(tool_choice: Any) -> bool:
    """Whether `tool_choice` forces a call ("required" or a named function), i.e. whether
    decoding must be constrained by `tool_call_grammar`."""
    return tool_choice == "required" or isinstance(tool_choice, dict)


def any_strict(tools: list[dict[str, Any]]) -> bool:
    """Whether any tool is declared `strict: true` (its schema must then be enforced)."""
    return any(bool(t.get("function", {}).get("strict")) for t in tools)


def _chosen_name(tool_choice: Any) -> str | None:
    """The named function of a tool_choice object; None for "required" and "auto"."""
    if tool_choice in ("required", "auto"):
        return None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        # {"type": "function", "function": {"name": N}}; the flat {"type": "function",
        # "name": N} of the Responses API is accepted as well.
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        if tool_choice.get("type", "function") == "function" and isinstance(name, str):
            return name
        raise ValueError(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}'
        )
    raise ValueError(f"tool_choice {tool_choice!r} does not call tools; no grammar applies")


def _args_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    schema = dict(params) if params else dict(_NO_PARAMETERS)
    schema.setdefault("type", "object")
    # Like OpenAI's strict mode: a constrained call names only the declared arguments, at
    # every level, and integers fit in 64 bits (a tool that wants free-form keys says so
    # with "additionalProperties").
    from ..schema_defaults import with_defaults

    schema = with_defaults(schema)
    # A strict tool promises its schema exactly: keywords llguidance cannot enforce are
    # then an error (HTTP 400), not silently ignored.
    style = {**_JSON_STYLE, "lenient": not fn.get("strict")}
    schema["x-guidance"] = {**schema.get("x-guidance", {}), **style}
    return schema


def _tag(text: str, added_tokens: Mapping[str, int] | None) -> str:
    """A Lark expression for a tag: the added token by id if it is one, else the literal."""
    if added_tokens and text in added_tokens:
        return f"<[{int(added_tokens[text])}]>"
    return json.dumps(text)


def tool_call_grammar(
    tools: list[dict[str, Any]],
    tool_choice: Any,
    fmt: str = "hermes",
    *,
    added_tokens: Mapping[str, int] | None = None,
    parallel_tool_calls: bool = True,
) -> str:
    """The Lark grammar (llguidance dialect) constraining calls for `tool_choice`.

    "required": one or more calls (exactly one if `parallel_tool_calls` is False) to any of
    `tools`; a named function: exactly one call to it. "auto": a lazy grammar, free text
    until the model opens a call in its native format (the tag, or for llama3_json a reply
    that starts with "{"), then calls as for "required". Arguments follow each tool's
    `parameters` schema. `fmt` is the tool-call format of `mlxtg.worker.tool_calls`;
    llama3_json joins several calls with "; ", mistral uses its array layout, or the
    `name[ARGS]{...}` layout when `[ARGS]` is in `added_tokens`.

    Raises ValueError for malformed tools, for a tool_choice that names no tool in `tools`
    or is "none", for an unknown format, and for a parameters schema llguidance cannot
    compile (with `strict: true`, one using keywords it cannot enforce).
    """
    validate_tools(tools)
    lazy = tool_choice == "auto"
    name = _chosen_name(tool_choice)
    if name is None:
        chosen = [t["function"] for t in tools]
        if not chosen:
            raise ValueError(f"tool_choice {tool_choice!r} needs at least one tool in tools")
    else:
        chosen = [t["function"] for t in tools if t["function"]["name"] == name]
        if not chosen:
            known = ", ".join(repr(t["function"]["name"]) for t in tools) or "none"
            raise ValueError(
                f"tool_choice names function {name!r}, which is not in tools (available: {known})"
            )
    many = name is None and parallel_tool_calls

    # Each layout is `call: OPENER body`, repeated as `calls`; `opener` is None for
    # llama3_json, whose calls are bare JSON objects.
    key = "parameters" if fmt == "llama3_json" else "arguments"
    json_fns = [
        # JSON string escapes are valid in Lark literals; names need none (validate_tools).
        json.dumps(f'{{"name": "{fn["name"]}", "{key}": ') + f" args_{i} " + json.dumps("}")
        for i, fn in enumerate(chosen)
    ]
    opener: str | None
    if fmt == "mistral" and added_tokens and "[ARGS]" in added_tokens:
        # v11+ layout: [TOOL_CALLS]name[ARGS]{...} per call, no JSON wrapper.
        opener, sep, body = "[TOOL_CALLS]", "", "fn"
        args_tag = _tag("[ARGS]", added_tokens)
        fns = [f"{json.dumps(fn['name'])} {args_tag} args_{i}" for i, fn in enumerate(chosen)]
    elif fmt == "hermes":
        opener, sep, fns = "<tool_call>", '"\\n"', json_fns
        body = f'"\\n" fn "\\n" {_tag("</tool_call>", added_tokens)}'
    elif fmt == "mistral":
        opener, sep, fns = "[TOOL_CALLS]", "", json_fns
        body = '"[" fn (", " fn)* "]"' if many else '"[" fn "]"'
        many = False  # several calls share one [TOOL_CALLS] array
    elif fmt == "llama3_json":
        opener, sep, body, fns = None, '"; "', "fn", json_fns
    else:
        raise ValueError(
            f"no tool-call grammar for format {fmt!r}; known formats: "
            "hermes, llama3_json, mistral"
        )
    more = f" ({sep} call)*" if many else ""
    call = f"{_tag(opener, added_tokens)} {body}" if opener else body
    rules = [f"calls: call{more}", f"call: {call}"]
    if not lazy:
        rules.insert(0, "start: calls")
    elif opener is None:
        # A reply that starts with "{" is a call; any other reply is free text.
        rules[:0] = ["start: TEXT? | calls", "TEXT: /[^{](.|\\n)*/"]
    elif added_tokens and opener in added_tokens:
        # Free text cannot spell a special token, so the tag token is the trigger.
        rules[:0] = ["start: TEXT? calls?", "TEXT: /(.|\\n)+/"]
    else:
        # A lazy lexeme ends at the first opener; from there the call is constrained.
        rules[:0] = [
            f"start: TEXT | opened {body}{more}",
            "TEXT: /(.|\\n)*/",
            f"opened[lazy]: /(.|\\n)*{re.escape(opener)}/",
        ]
    rules.append("fn: " + " | ".join(fns))
    rules += [f"args_{i}: %json {json.dumps(_args_schema(fn))}" for i, fn in enumerate(chosen)]
    lark = "\n".join(rules) + "\n"
    _check(lark, chosen)
    return lark


def _check(lark: str, chosen: list[dict[str, Any]]) -> None:
    """Compile the grammar once so a bad schema is a 400 now, not an error mid-decode."""
    from llguidance import LLMatcher

    err = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(lark))
    if not err:
        return
    for fn in chosen:  # find the tool to blame
        schema = LLMatcher.grammar_from_json_schema(_args_schema(fn))
        if msg := LLMatcher.validate_grammar(schema):
            raise ValueError(
                f"the parameters schema of tool {fn['name']!r} is not supported: {msg.strip()}"
            )
    raise ValueError(f"cannot build the tool-call grammar: {err.strip()}")
