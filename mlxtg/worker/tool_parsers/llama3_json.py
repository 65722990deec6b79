"""Llama 3.x JSON format: the reply is `{"name": ..., "parameters": {...}}`.

The object may be preceded by `<|python_tag|>` (which may also appear after some text);
several calls may follow each other, separated by `;` and/or whitespace.
"""

from __future__ import annotations

from ._base import BaseParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(BaseParser):
    """A call is a JSON object at the very start of the reply, or after `<|python_tag|>`.

    A reply that starts with `{` is held back until the object is complete, since only then
    is it known whether it is a call; a non-call object is then returned as content.
    """

    TRIGGERS = (PYTHON_TAG,)

    def _find_trigger(self, buf: str) -> tuple[int, int] | None:
        hit = super()._find_trigger(buf)
        if self._at_start:
            body = buf.lstrip()
            pos = len(buf) - len(body)
            if body.startswith("{") and (hit is None or pos < hit[0]):
                return (pos, 0)  # the scanner consumes the brace itself
        return hit

    def _after_call_state(self) -> str:
        return "sep"

    def _step_format(self, final: bool) -> bool:
        # "sep": right after a call, optional `;`; "next": after `;`, another call or text.
        buf = self._buf.lstrip()
        self._prefix += self._buf[: len(self._buf) - len(buf)]
        self._buf = buf
        if not buf:
            return False
        if buf[0] == ";" and self._state == "sep":
            self._buf = buf[1:]
            self._prefix += ";"
            self._state = "next"
        elif buf[0] == "{":
            self._begin_call()
        else:
            # Not another call: the separator text is dropped like whitespace around calls.
            self._prefix, self._state = "", "text"
        return True
