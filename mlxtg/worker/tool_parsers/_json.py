"""Incremental, strict validation of one streamed JSON object.

Tool-call arguments are forwarded to clients while the model is still writing them, so we
must know, character by character, that what we forward is a prefix of valid JSON and where
each top-level member's value starts and ends. `json.JSONDecoder` only works on complete
text, hence this small push-down validator (RFC 8259, no NaN/Infinity, no comments).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["JsonObjectScanner", "strict_loads"]

# Scanner states: structural ones, string ones, number ones (one per grammar position), literal.
(
    _VALUE,
    _OBJ_FIRST,
    _KEY,
    _COLON,
    _AFTER,
    _ARR_FIRST,
    _STR,
    _ESC,
    _UHEX,
    _N_MINUS,
    _N_ZERO,
    _N_INT,
    _N_DOT,
    _N_FRAC,
    _N_E,
    _N_ESIGN,
    _N_EXP,
    _LIT,
) = range(18)
_STRUCTURAL = frozenset((_VALUE, _OBJ_FIRST, _KEY, _COLON, _AFTER, _ARR_FIRST))
_NUM_COMPLETE = frozenset((_N_ZERO, _N_INT, _N_FRAC, _N_EXP))
_WS = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_VALUE_START = frozenset('{["-tfn') | _DIGITS
# Inside a string everything but quote, backslash and control characters needs no state change.
_STR_RUN = re.compile(r'[^"\\\x00-\x1f]+')


def _num_step(state: int, c: str) -> int | None:
    """Next number state after `c`, or None if `c` cannot continue the number."""
    if c in _DIGITS:
        if state in (_N_MINUS, _N_INT):
            return _N_ZERO if state == _N_MINUS and c == "0" else _N_INT
        if state in (_N_DOT, _N_FRAC):
            return _N_FRAC
        if state in (_N_E, _N_ESIGN, _N_EXP):
            return _N_EXP
        return None  # a digit after a leading zero
    if c == "." and state in (_N_ZERO, _N_INT):
        return _N_DOT
    if c in "eE" and state in (_N_ZERO, _N_INT, _N_FRAC):
        return _N_E
    if c in "+-" and state == _N_E:
        return _N_ESIGN
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strict_loads(text: str) -> Any:
    """`json.loads` that, like the scanner, refuses NaN and Infinity."""
    return json.loads(text, parse_constant=_reject_constant)


class JsonObjectScanner:
    """Validates one JSON object as it arrives, tracking its top-level members.

    `text` holds everything consumed so far, which is always a prefix of valid JSON (the
    first non-whitespace character must be `{`). `members` maps each top-level key to the
    `[start, end)` span of its raw value in `text`; `end` is -1 while the value is open.
    A duplicate top-level key counts as an error, since it would make the call ambiguous.
    """

    __slots__ = (
        "text",
        "done",
        "error",
        "members",
        "_stack",
        "_state",
        "_key_start",
        "_key",
        "_in_key",
        "_lit",
        "_hex",
    )

    def __init__(self) -> None:
        self.text = ""
        self.done = False  # the object's closing brace was consumed
        self.error = False  # the next character could not continue valid JSON
        self.members: dict[str, list[int]] = {}
        self._stack: list[str] = []
        self._state = _VALUE
        self._key_start = 0
        self._key = ""
        self._in_key = False
        self._lit = ""  # remaining characters of true/false/null
        self._hex = 0  # \uXXXX digits still expected

    def feed(self, s: str) -> int:
        """Consume `s` up to the object's end or the first invalid character (which is left
        unconsumed and sets `error`). Returns the number of characters consumed."""
        if self.done or self.error:
            return 0
        base = len(self.text)
        self.text += s  # trimmed back below if we stop early
        i, n = 0, len(s)
        while i < n and not self.done:
            c, st = s[i], self._state
            if st == _STR:
                m = _STR_RUN.match(s, i)
                if m:
                    i = m.end()
                elif c == '"':
                    i += 1
                    if not self._end_string(base + i):
                        i -= 1
                        break
                elif c == "\\":
                    self._state = _ESC
                    i += 1
                else:
                    break  # raw control character
            elif st == _ESC:
                if c == "u":
                    self._state, self._hex = _UHEX, 4
                elif c in '"\\/bfnrt':
                    self._state = _STR
                else:
                    break
                i += 1
            elif st == _UHEX:
                if c not in _HEX:
                    break
                self._hex -= 1
                if not self._hex:
                    self._state = _STR
                i += 1
            elif st in _STRUCTURAL and c in _WS:
                i += 1
            elif st in (_VALUE, _ARR_FIRST):
                if st == _ARR_FIRST and c == "]":
                    self._close(base + i + 1)
                elif not self._start_value(c, base + i):
                    break
                i += 1
            elif st in (_OBJ_FIRST, _KEY):
                if c == '"':
                    self._state, self._in_key, self._key_start = _STR, True, base + i
                elif c == "}" and st == _OBJ_FIRST:
                    self._close(base + i + 1)
                else:
                    break
                i += 1
            elif st == _COLON:
                if c != ":":
                    break
                self._state = _VALUE
                i += 1
            elif st == _AFTER:
                top = self._stack[-1]
                if c == ",":
                    self._state = _KEY if top == "{" else _VALUE
                elif c == ("}" if top == "{" else "]"):
                    self._close(base + i + 1)
                else:
                    break
                i += 1
            elif st == _LIT:
                if c != self._lit[0]:
                    break
                self._lit = self._lit[1:]
                i += 1
                if not self._lit:
                    self._end_value(base + i)
            else:  # inside a number
                nxt = _num_step(st, c)
                if nxt is None:
                    if st not in _NUM_COMPLETE:
                        break
                    self._end_value(base + i)  # `c` is examined again in the _AFTER state
                    continue
                self._state = nxt
                i += 1
        if i < n and not self.done:
            self.error = True
        if i < n:
            self.text = self.text[: base + i]
        return i

    def _start_value(self, c: str, at: int) -> bool:
        if not self._stack and c != "{":
            return False  # the top level must be an object
        if c not in _VALUE_START:
            return False
        if len(self._stack) == 1:
            self.members[self._key] = [at, -1]
        if c == "{" or c == "[":
            self._stack.append(c)
            self._state = _OBJ_FIRST if c == "{" else _ARR_FIRST
        elif c == '"':
            self._state, self._in_key = _STR, False
        elif c == "-":
            self._state = _N_MINUS
        elif c in _DIGITS:
            self._state = _N_ZERO if c == "0" else _N_INT
        else:
            self._state, self._lit = _LIT, _LITERALS[c]
        return True

    def _end_string(self, end: int) -> bool:
        if not self._in_key:
            self._end_value(end)
            return True
        if len(self._stack) == 1:
            key = json.loads(self.text[self._key_start : end])
            if key in self.members:
                return False
            self._key = key
        self._state = _COLON
        return True

    def _close(self, end: int) -> None:
        self._stack.pop()
        self._end_value(end)

    def _end_value(self, end: int) -> None:
        if not self._stack:
            self.done = True
            return
        if len(self._stack) == 1:
            self.members[self._key][1] = end
        self._state = _AFTER
