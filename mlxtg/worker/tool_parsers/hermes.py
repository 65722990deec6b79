"""Hermes / Qwen format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`."""

from __future__ import annotations

from ._base import BaseParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(BaseParser):
    """Calls wrapped in `<tool_call>` tags, any number of them, anywhere in the text.

    The closing tag is optional: a complete call object is a call even if the model stops
    or goes on with text without closing the tag.
    """

    TRIGGERS = (OPEN,)

    def _after_call_state(self) -> str:
        return "close"

    def _step_format(self, final: bool) -> bool:  # state "close": expect `</tool_call>`
        buf = self._buf = self._buf.lstrip()
        if not buf:
            return False
        if buf.startswith(CLOSE):
            self._buf = buf[len(CLOSE) :]
        elif CLOSE.startswith(buf) and not final:
            return False
        self._state = "text"
        return True
