"""The streaming engine shared by all tool-call formats.

Output is free text in which a *trigger* (a tag such as `<tool_call>`) opens a call written
as a JSON object `{"name": ..., "arguments": {...}}`. Subclasses name their triggers and
add their own states for what may surround the objects (closing tags, separators).

Streaming contract (see `mlxtg.worker.tool_calls` for the public interface):

* Text is emitted as soon as it cannot be the start of a trigger. Whitespace around calls
  is dropped (a reply made only of calls has no content), except that text resuming after
  calls is separated from the text before them by the whitespace that preceded the calls.
* A call is announced (id + name) once its name is known and its arguments value has begun
  with `{`; from then on the model's own argument text is forwarded verbatim, but only as
  far as it has been validated as JSON, so the fragments concatenate to exactly the final
  arguments string.
* A call whose object is malformed or never finished is returned as content, verbatim. If
  it had already been announced, what was streamed cannot be taken back: the call stays in
  the stream with its partial arguments (as OpenAI does for a call cut by max_tokens), it
  is not counted in `calls`/`called`, and the text after the streamed part becomes content.
  With `stream_arguments=False` nothing is announced before the call is complete, so a
  malformed call is always pure content.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ...protocol import ToolCallFragment
from ._json import JsonObjectScanner, strict_loads

__all__ = ["BaseParser", "ParsedDelta", "ToolCall", "ToolCallDelta", "new_call_id"]

# Keys that may hold the arguments: Hermes/Qwen/Mistral say "arguments", Llama "parameters".
_ARG_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    """A fresh OpenAI-style call id: "call_" + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


# One streamed piece of a tool call: the parsers make the protocol's record itself, which
# goes out as an entry of `delta.tool_calls` as it is.
ToolCallDelta = ToolCallFragment


@dataclass(slots=True)
class ParsedDelta:
    """What a `feed`/`finish` step yields: content text and tool-call pieces to send now."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A complete, valid call: `arguments` is the JSON text of an object."""

    id: str
    name: str
    arguments: str

    def to_wire(self) -> dict[str, Any]:
        """The OpenAI `message.tool_calls[]` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class _Call:
    """The call object being parsed; `name` is preset when the format gives it outside."""

    __slots__ = ("scan", "name", "index", "id", "sent")

    def __init__(self, name: str | None) -> None:
        self.scan = JsonObjectScanner()
        self.name = name
        self.index = -1
        self.id = ""
        self.sent = -1  # offset in scan.text up to which arguments were streamed; -1: not announced

    def header_name(self) -> str | None:
        if self.name is not None:
            return self.name
        span = self.scan.members.get("name")
        if span is None or span[1] < 0 or self.scan.text[span[0]] != '"':
            return None
        return json.loads(self.scan.text[span[0] : span[1]]) or None

    def args_span(self) -> tuple[int, int] | None:
        """Where an object-valued arguments member lies in `scan.text` (end -1 while open)."""
        text = self.scan.text
        if self.name is not None:  # the whole object is the arguments
            start = len(text) - len(text.lstrip())
            return (start, len(text) if self.scan.done else -1) if start < len(text) else None
        span = self._args_member()
        if span is None or text[span[0]] != "{":
            return None
        return (span[0], span[1])

    def _args_member(self) -> list[int] | None:
        # If a model writes both keys, the first one written wins, so that the choice made
        # when the call was announced never changes.
        spans = [self.scan.members[k] for k in _ARG_KEYS if k in self.scan.members]
        return min(spans) if spans else None

    def final_args(self) -> str | None:
        """The arguments JSON text of a finished object, or None if they are not an object.

        A missing arguments member means a call without arguments ("{}"); arguments given as
        a string holding a JSON object (some fine-tunes do this) are unwrapped.
        """
        span = self.args_span()
        if span is not None:
            return self.scan.text[span[0] : span[1]] if span[1] >= 0 else None
        m = self._args_member()
        if m is None:
            return "{}"
        raw = self.scan.text[m[0] : m[1]]
        if m[1] < 0 or raw[0] != '"':
            return None
        inner = json.loads(raw)
        try:
            return inner.strip() if isinstance(strict_loads(inner), dict) else None
        except ValueError:
            return None


class BaseParser:
    """Format-independent streaming tool-call parser; see the module docstring.

    Subclasses set `TRIGGERS`, may override `_find_trigger`, `_on_trigger` and
    `_after_call_state`, and handle their extra states in `_step_format`.
    """

    TRIGGERS: tuple[str, ...] = ()

    def __init__(self, tools: Iterable[dict[str, Any]] = (), *, stream_arguments: bool = True):
        # Names are kept for callers' convenience only: calls to unknown names are still
        # reported, validating them is the client's job (as with OpenAI's own API).
        self.tool_names = frozenset(
            t.get("function", {}).get("name", "") for t in tools if isinstance(t, dict)
        )
        self.calls: list[ToolCall] = []
        self._stream = stream_arguments
        self._buf = ""
        self._state = "text"
        self._glue = False  # just after a call: leading whitespace is dropped
        self._gap = ""  # whitespace between text and the calls that follow it
        self._emitted = False  # some content was emitted
        self._at_start = True  # nothing but whitespace seen so far
        self._prefix = ""  # text consumed before the current call object (tag, whitespace)
        self._call: _Call | None = None
        self._next_index = 0
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []

    @property
    def called(self) -> bool:
        """True once at least one complete, valid call has been parsed."""
        return bool(self.calls)

    def feed(self, text: str) -> ParsedDelta:
        """Consume the next chunk of model output; return what can be sent now."""
        self._buf += text
        while self._step(False):
            pass
        return self._take()

    def finish(self) -> ParsedDelta:
        """End of output: flush held-back text and settle an unfinished call."""
        while self._step(True):
            pass
        if self._buf.strip():  # defensive: no state may leave text behind at the end
            self._emit(self._buf)
        self._buf = ""
        return self._take()

    # --- hooks -------------------------------------------------------------------------------

    def _find_trigger(self, buf: str) -> tuple[int, int] | None:
        """(position, length) of the first trigger in `buf`, if any."""
        hits = [(i, len(t)) for t in self.TRIGGERS if (i := buf.find(t)) >= 0]
        return min(hits) if hits else None

    def _on_trigger(self, trigger: str) -> None:
        self._begin_call()

    def _after_call_state(self) -> str:
        return "text"

    def _step_format(self, final: bool) -> bool:
        raise AssertionError(f"unhandled parser state {self._state!r}")

    # --- engine ------------------------------------------------------------------------------

    def _take(self) -> ParsedDelta:
        out = ParsedDelta("".join(self._content), self._deltas)
        self._content, self._deltas = [], []
        return out

    def _emit_call(
        self, index: int, *, id: str | None = None, name: str | None = None, arguments: str = ""
    ) -> None:
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == index and id is None:
            last.arguments += arguments  # one piece per call per step
        else:
            self._deltas.append(ToolCallDelta(index, id, name, arguments))

    def _step(self, final: bool) -> bool:
        """Advance by one state transition; False when more input is needed (or at the end)."""
        if self._state == "text":
            return self._step_text(final)
        if self._state == "call":
            return self._step_call(final)
        return self._step_format(final)

    def _emit(self, text: str) -> None:
        """Emit content; text resuming after calls gets back the whitespace that preceded
        them, so "A\n<call>\nB" reads "A\nB"."""
        if self._glue:
            text, self._gap, self._glue = self._gap + text, "", False
        self._content.append(text)
        self._emitted = True

    def _step_text(self, final: bool) -> bool:
        buf = self._buf
        if self._glue:
            buf = self._buf = buf.lstrip()
        if not buf:
            return False
        hit = self._find_trigger(buf)
        if buf.strip():
            self._at_start = False
        if hit is not None:
            pos, length = hit
            kept = buf[:pos].rstrip()
            if kept:
                self._emit(kept)
            if kept or (self._emitted and not self._glue):
                self._gap = buf[len(kept) : pos]  # else a run of calls goes on: keep its gap
            self._prefix = buf[len(kept) : pos + length]  # restored if the call fails
            self._buf = buf[pos + length :]
            self._on_trigger(buf[pos : pos + length])
            return True
        if final:
            self._emit(buf)
            self._buf = ""
            return False
        # Hold back a possible trigger start, and the whitespace before it: it is dropped if
        # a call follows.
        hold = max(
            (k for t in self.TRIGGERS for k in range(1, len(t)) if buf.endswith(t[:k])), default=0
        )
        cut = len(buf[: len(buf) - hold].rstrip())
        if cut:
            self._emit(buf[:cut])
        self._buf = buf[cut:]
        return False

    def _begin_call(self, name: str | None = None) -> None:
        self._call = _Call(name)
        self._state = "call"

    def _step_call(self, final: bool) -> bool:
        call = self._call
        assert call is not None
        if self._buf:
            n = call.scan.feed(self._buf)
            self._buf = self._buf[n:]
            self._sync(call)
            if call.scan.done:
                self._complete(call)
                return True
            if not call.scan.error:
                return False
        elif not final:
            return False
        # Broken or unterminated. Be lenient about a missing/garbled outer closing brace when
        # the name and a complete arguments object are there and only whitespace follows.
        span = call.args_span()
        if (
            call.name is None
            and span is not None
            and span[1] >= 0
            and not call.scan.text[span[1] :].strip()
            and call.header_name()
        ):
            self._complete(call)
        else:
            self._fail(call)
        return True

    def _sync(self, call: _Call) -> None:
        """Announce the call and stream newly validated argument text (streaming mode)."""
        if not self._stream:
            return
        span = call.args_span()
        if call.sent < 0:
            name = call.header_name()
            if span is None or name is None:
                return
            call.index, call.id, call.sent = self._next_index, new_call_id(), span[0]
            self._next_index += 1
            self._emit_call(call.index, id=call.id, name=name)
        assert span is not None
        end = span[1] if span[1] >= 0 else len(call.scan.text)
        if end > call.sent:
            self._emit_call(call.index, arguments=call.scan.text[call.sent : end])
            call.sent = end

    def _complete(self, call: _Call) -> None:
        name, args = call.header_name(), call.final_args()
        if name is None or args is None:
            self._fail(call)
            return
        if call.sent < 0:
            call.index, call.id = self._next_index, new_call_id()
            self._next_index += 1
            self._emit_call(call.index, id=call.id, name=name, arguments=args)
        self.calls.append(ToolCall(call.id, name, args))
        self._call, self._prefix, self._glue = None, "", True
        self._state = self._after_call_state()

    def _fail(self, call: _Call) -> None:
        if call.sent >= 0:  # already streamed: only the rest can still become content
            space = self._prefix[: len(self._prefix) - len(self._prefix.lstrip())]
            lost = space + call.scan.text[call.sent :]
        else:
            lost = self._prefix + call.scan.text
        if lost:
            self._emit(lost)
        self._call, self._prefix, self._glue = None, "", False
        self._state = "text"

    def _fail_prefix(self) -> None:
        """Give up on a call group before any object began: its text becomes content."""
        if self._prefix:
            self._emit(self._prefix)
        self._prefix, self._glue, self._state = "", False, "text"
