"""Tool calls in model output: streaming parsers for the formats models are trained on.

A parser is fed the detokenized output chunk by chunk (any split) and returns, each time,
the content text and tool-call pieces that can be sent to the client right away:

    parser = make_parser(detect_format(tokenizer.chat_template, tokenizer.get_vocab()), tools)
    for chunk in chunks:
        delta = parser.feed(chunk)      # -> delta.content, delta.tool_calls
    tail = parser.finish()
    finish_reason = "tool_calls" if parser.called else "stop"

Guarantees (the formats differ only in how calls are delimited):

* Content is the text outside calls, streamed without delay except for a possible tag
  start (e.g. a trailing "<tool_") and trailing whitespace. Whitespace around calls is
  dropped, so a reply of calls only has no content, but text resuming after calls keeps
  the whitespace that preceded them ("A\n<call>\nB" gives "A\nB").
* A call is announced (`id`, `name`) once its name is known and its arguments object has
  begun; argument fragments are then the model's own text, validated as JSON before being
  sent, so per call they concatenate exactly to the final `arguments`, a JSON object.
* Arguments that are not a JSON object (array, number, invalid JSON, unterminated) make the
  call malformed: its text is returned as content, verbatim, and it does not count for
  `called`. Exceptions, for robustness: missing arguments mean "{}", arguments given as a
  string holding a JSON object are unwrapped, and a missing final `}` of the call object
  is forgiven when the arguments object itself is complete.
* If a call breaks after it was announced (streaming mode), the streamed pieces stay sent
  (like OpenAI's calls cut by max_tokens); the rest becomes content, `called` ignores it.
  Pass `stream_arguments=False` to announce calls only when complete (then a malformed
  call is pure content, as a non-streaming response wants).
* Calls to names that are not among `tools` are reported like any other: as with OpenAI,
  validating names and arguments is the client's job. (Forced calls are constrained by
  `mlxtg.worker.tool_grammar` and always match the tools.)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from .tool_parsers import PARSERS, ParsedDelta, ToolCall, ToolCallDelta, new_call_id

__all__ = [
    "FORMATS",
    "ParsedDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "detect_format",
    "make_parser",
    "new_call_id",
]

FORMATS: tuple[str, ...] = tuple(PARSERS)

# The markers that identify a format, most specific first: Hermes-style fine-tunes of
# Llama/Mistral bases keep their base vocabulary, so <tool_call> must win over the others.
_MARKERS: tuple[tuple[str, str], ...] = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)


class ToolCallParser(Protocol):
    """A streaming tool-call parser (see the module docstring for its guarantees)."""

    calls: list[ToolCall]  # the complete, valid calls so far

    def feed(self, text: str) -> ParsedDelta:
        """Consume the next chunk of detokenized output; return what to send now."""
        ...

    def finish(self) -> ParsedDelta:
        """End of generation: flush held-back text and settle an unfinished call."""
        ...

    @property
    def called(self) -> bool:
        """At least one complete, valid call was parsed (finish_reason "tool_calls")."""
        ...


def make_parser(
    fmt: str, tools: list[dict[str, Any]], *, stream_arguments: bool = True
) -> ToolCallParser:
    """A new parser for one choice of one request.

    fmt: "hermes" (Hermes, Qwen and the demo model), "llama3_json" or "mistral".
    stream_arguments: announce calls before they are complete and stream their arguments
        (for streaming responses); False reports each call in one piece once complete.
    Raises ValueError for an unknown format.
    """
    cls = PARSERS.get(fmt)
    if cls is None:
        raise ValueError(f"unknown tool-call format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return cls(tools, stream_arguments=stream_arguments)


def detect_format(chat_template: str | None, vocab: Collection[str]) -> str:
    """The tool-call format a model was trained on, judged from its chat template and vocab.

    The template decides when it mentions a marker (it shows the model's own call syntax);
    otherwise the vocabulary; "hermes" by default. "ipython" (the Llama 3 tool-result role)
    in the template also means llama3_json.
    """
    template = chat_template or ""
    for marker, fmt in _MARKERS:
        if marker in template:
            return fmt
    if "ipython" in template:
        return "llama3_json"
    for marker, fmt in _MARKERS:
        if marker in vocab:
            return fmt
    return "hermes"
