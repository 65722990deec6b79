"""Mistral formats: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers)
and `[TOOL_CALLS]name[ARGS]{...}` (v11+ tokenizers), one tag per call."""

from __future__ import annotations

import re

from ._base import BaseParser

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"
_NAME_ARGS = re.compile(r"([A-Za-z0-9_.:\-]+)\[ARGS\]")
# A name still being written, possibly followed by the start of `[ARGS]`.
_NAME_PARTIAL = re.compile(r"[A-Za-z0-9_.:\-]*(\[(A(R(G(S)?)?)?)?)?")


class MistralParser(BaseParser):
    """Handles both Mistral layouts after `[TOOL_CALLS]`: a JSON array of call objects (a
    bare object is accepted too), or a function name, `[ARGS]` and the arguments object.
    A missing closing `]` is tolerated once the calls in the array were complete; an empty
    list (`[TOOL_CALLS][]`) is dropped, as it says nothing."""

    TRIGGERS = (TOOL_CALLS,)
    _in_array = False  # set per call group by the "open" state

    def _on_trigger(self, trigger: str) -> None:
        self._state = "open"

    def _after_call_state(self) -> str:
        return "sep" if self._in_array else "text"

    def _step_format(self, final: bool) -> bool:
        buf = self._buf.lstrip()
        if self._state != "name":  # whitespace is insignificant around JSON punctuation
            self._prefix += self._buf[: len(self._buf) - len(buf)]
            self._buf = buf
        if not buf:
            if final and self._state in ("open", "item", "name"):
                self._fail_prefix()
                return True
            return False
        c = buf[0]
        if self._state == "open":
            self._in_array = c == "["
            if c == "[":
                self._take_prefix(1, "item")
            elif c == "{":
                self._begin_call()
            elif _NAME_PARTIAL.match(buf).end() > 0:  # type: ignore[union-attr]
                self._state = "name"
            else:
                self._fail_prefix()
        elif self._state == "name":
            m = _NAME_ARGS.match(self._buf)
            if m:
                self._take_prefix(m.end(), "")
                self._begin_call(m.group(1))
            elif final or not _NAME_PARTIAL.fullmatch(self._buf):
                self._fail_prefix()
            else:
                return False
        elif self._state == "item":
            if c == "{":
                self._begin_call()
            elif c == "]":
                self._take_prefix(1, "text")
                self._prefix, self._glue = "", True
            else:
                self._fail_prefix()
        else:  # "sep": after a call inside the array
            if c == ",":
                self._take_prefix(1, "item")
            else:
                if c == "]":
                    self._buf = buf[1:]
                self._prefix, self._glue, self._state = "", True, "text"
        return True

    def _take_prefix(self, n: int, state: str) -> None:
        self._prefix += self._buf[:n]
        self._buf = self._buf[n:]
        self._state = state
