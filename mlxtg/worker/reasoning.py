"""Reasoning models: which markers a model thinks between, and where its thinking ends.

Pure (no MLX): `detect` finds a model's `ReasoningFormat` from its tokenizer, `initial_phase`
reads the rendered prompt, `ReasoningSplitter` routes output text to reasoning or answer,
`ReasoningTracker` follows raw token bytes for the engine (counting, forcing the end marker
once a cap is spent), and `prefix_lark` / `compose` put a grammar behind the thinking.
See docs/reasoning-design.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

__all__ = [
    "Phase",
    "ReasoningFormat",
    "ReasoningPlan",
    "ReasoningSplitter",
    "ReasoningTracker",
    "compose",
    "detect",
    "initial_phase",
    "prefix_lark",
    "tail_start",
]

PARSERS = ("auto", "none", "think", "harmony")
# Single-token pairs mlx-lm also knows; used when given a bare HF tokenizer.
_THINK_PAIRS = (
    ("<think>", "</think>"),
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
)
_BRACKET = ("[THINK]", "[/THINK]")  # Magistral 2507+
_HARMONY_VOCAB = ("<|channel|>", "<|message|>", "<|start|>", "<|end|>")
_HARMONY = (
    "<|channel|>analysis<|message|>",
    "<|end|><|start|>assistant<|channel|>final<|message|>",
    "<|channel|>final<|message|>",  # an answer with no analysis before it
)
_TAIL_CHARS = 256  # of the rendered prompt, where a generation prompt opens or closes a block


class Phase(Enum):
    MAYBE = "maybe"  # the model may open a reasoning block with its first tokens
    REASONING = "reasoning"  # inside the block: everything up to the end marker is reasoning
    ANSWER = "answer"  # after the block, or no block


Part = int | str  # an added token's id, or plain text


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    """The markers around a model's reasoning. `*_parts` spell each marker as added-token
    ids and plain text (the grammar needs `<[id]>` for added tokens). `answer_start` is an
    answer header that may replace the whole block (harmony's final channel)."""

    name: str  # "think" or "harmony"
    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    start_parts: tuple[Part, ...] = ()
    end_parts: tuple[Part, ...] = ()
    answer_start: str = ""
    answer_parts: tuple[Part, ...] = ()

    def __str__(self) -> str:  # for READY and `mlxtg status`
        return f"{self.name}({self.start},{self.end})"


@dataclass(frozen=True, slots=True)
class ReasoningPlan:
    """One chat request's reasoning: the model's format, where the rendered prompt leaves
    the model (`phase`) and the cap on reasoning text tokens (None: no cap)."""

    fmt: ReasoningFormat
    phase: Phase
    cap: int | None = None

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.fmt, self.phase)

    def tracker(self) -> ReasoningTracker:
        return ReasoningTracker(self.fmt, self.phase, self.cap)


def _parts(tag: str, added: dict[str, int]) -> tuple[Part, ...]:
    """`tag` cut into added tokens (longest match first) and the plain text between them."""
    out: list[Part] = []
    names = sorted((a for a in added if a and a in tag), key=len, reverse=True)
    i = 0
    while i < len(tag):
        hit = next((a for a in names if tag.startswith(a, i)), None)
        if hit is not None:
            out.append(added[hit])
            i += len(hit)
        elif out and isinstance(out[-1], str):
            out[-1] += tag[i]
            i += 1
        else:
            out.append(tag[i])
            i += 1
    return tuple(out)


def _format(tok: Any, name: str, start: str, end: str, answer_start: str = "") -> ReasoningFormat:
    added = dict(tok.get_added_vocab())

    def ids(text: str) -> tuple[int, ...]:
        return tuple(int(i) for i in tok.encode(text, add_special_tokens=False))

    return ReasoningFormat(
        name,
        start,
        end,
        ids(start),
        ids(end),
        _parts(start, added),
        _parts(end, added),
        answer_start,
        _parts(answer_start, added),
    )


def detect(
    tokenizer: Any, parser: str = "auto", tags: tuple[str, str] | None = None
) -> ReasoningFormat | None:
    """The reasoning format of a model (mlx-lm's TokenizerWrapper or a HF tokenizer).

    Order: `parser` "none" -> None; explicit `tags`; mlx-lm's detected think tags;
    `[THINK]`/`[/THINK]` in the vocab; harmony tokens; `</think>` in the chat template
    (text tags); else None ("think" then falls back to `<think>`/`</think>` as text).
    """
    if parser not in PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(PARSERS)}, not {parser!r}")
    if parser == "none":
        return None
    if tags is not None:
        if len(tags) != 2 or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"reasoning_tags must be two non-empty strings, not {tags!r}")
        return _format(tokenizer, "think", tags[0], tags[1])
    vocab = tokenizer.get_vocab()
    harmony = all(t in vocab for t in _HARMONY_VOCAB)
    if parser == "harmony":
        if not harmony:
            raise ValueError("reasoning_parser harmony: the vocabulary has no harmony tokens")
        return _format(tokenizer, "harmony", *_HARMONY)
    if getattr(tokenizer, "has_thinking", False):  # mlx-lm's TokenizerWrapper
        start, end = tokenizer.think_start, tokenizer.think_end
        fmt = _format(tokenizer, "think", start, end)
        s_ids, e_ids = tokenizer.think_start_tokens, tokenizer.think_end_tokens
        if s_ids and e_ids:  # mlx-lm's own ids for the markers
            fmt = replace(fmt, start_ids=tuple(s_ids), end_ids=tuple(e_ids))
        return fmt
    for start, end in _THINK_PAIRS + (_BRACKET,):
        if start in vocab and end in vocab:
            return _format(tokenizer, "think", start, end)
    if harmony and parser == "auto":
        return _format(tokenizer, "harmony", *_HARMONY)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = "\n".join(str(t) for t in template.values())
    if parser == "think" or (isinstance(template, str) and "</think>" in template):
        return _format(tokenizer, "think", "<think>", "</think>")
    return None


def initial_phase(fmt: ReasoningFormat, prompt_text: str) -> Phase:
    """Where the model starts, from the end of the rendered prompt: a start marker after the
    last end marker -> REASONING; an end marker (or answer header) with only whitespace after
    it -> ANSWER (e.g. `enable_thinking: false`); else MAYBE."""
    tail = prompt_text[-_TAIL_CHARS:]
    s, e = tail.rfind(fmt.start), tail.rfind(fmt.end)
    if s >= 0 and s > e:
        return Phase.REASONING
    if e >= 0 and not tail[e + len(fmt.end) :].strip():
        return Phase.ANSWER
    if fmt.answer_start and tail.rstrip().endswith(fmt.answer_start):
        return Phase.ANSWER
    return Phase.MAYBE


_TAIL_TOKENS = 16  # where a generation prompt's opening or closed block sits


def tail_start(fmt: ReasoningFormat, prompt: Sequence[int]) -> int:
    """Where the template's reasoning tail (an opened `<think>\n` or a closed empty block)
    starts in the prompt's last tokens, or 0. The next turn renders this turn without it,
    so the prompt up to here is what the next prompt shares."""
    ids = fmt.start_ids
    if not ids:
        return 0
    first = max(len(prompt) - _TAIL_TOKENS, 0)
    for i in range(len(prompt) - len(ids), first - 1, -1):
        if tuple(prompt[i : i + len(ids)]) == ids:
            return i
    return 0


def reasoning_at(fmt: ReasoningFormat) -> Any:
    """`explain(tokens, n)` for the prompt cache: True when a start marker begins at
    position n of stored tokens (the next turn's template dropped that reasoning)."""
    ids = fmt.start_ids

    def explain(tokens: Sequence[int], n: int) -> bool:
        return bool(ids) and tuple(int(t) for t in tokens[n : n + len(ids)]) == ids

    return explain


def _held(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Routes one sequence's output text to (reasoning, answer), markers removed.

    MAYBE opens a block only on a start marker at the very beginning (after whitespace);
    anything else there makes all text answer, unchanged. A possible partial marker is held
    back. Reasoning loses its leading whitespace and the whitespace before the end marker
    (held while streaming); the answer after a block loses its leading whitespace.
    """

    __slots__ = ("fmt", "phase", "_buf", "_lead")

    def __init__(self, fmt: ReasoningFormat, phase: Phase):
        self.fmt = fmt
        self.phase = phase
        self._buf = ""  # text held back
        self._lead = True  # reasoning / answer still owe their leading-whitespace strip

    def feed(self, text: str) -> tuple[str, str]:
        """Add detokenised text; return the (reasoning, answer) text now safe to emit."""
        if self.phase is Phase.MAYBE:
            return self._maybe(text)
        if self.phase is Phase.REASONING:
            return self._reasoning(text)
        return "", self._answer(text)

    def finish(self) -> tuple[str, str]:
        """End of output: whatever is held (a partial marker is text after all)."""
        held, self._buf = self._buf, ""
        if self.phase is Phase.MAYBE:
            self.phase = Phase.ANSWER
            return "", held
        if self.phase is Phase.REASONING:
            return held.rstrip(), ""
        return "", ""

    def _maybe(self, text: str) -> tuple[str, str]:
        self._buf += text
        head, fmt = self._buf.lstrip(), self.fmt
        if not head:
            return "", ""
        if head.startswith(fmt.start):
            self.phase, self._buf = Phase.REASONING, ""
            return self._reasoning(head[len(fmt.start) :])
        if fmt.answer_start and head.startswith(fmt.answer_start):
            self.phase, self._buf = Phase.ANSWER, ""
            return "", self._answer(head[len(fmt.answer_start) :])
        if fmt.start.startswith(head) or fmt.answer_start.startswith(head):
            return "", ""  # may still become a marker
        held, self._buf = self._buf, ""
        self.phase, self._lead = Phase.ANSWER, False
        return "", held

    def _reasoning(self, text: str) -> tuple[str, str]:
        text = self._buf + text
        if self._lead:
            text = text.lstrip()
            self._lead = bool(not text)
        i = text.find(self.fmt.end)
        if i >= 0:
            self.phase, self._buf, self._lead = Phase.ANSWER, "", True
            return text[:i].rstrip(), self._answer(text[i + len(self.fmt.end) :])
        cut = len(text) - _held(text, self.fmt.end)
        out = text[:cut].rstrip()  # whitespace may turn out to precede the end marker
        self._buf = text[len(out) :]
        return out, ""

    def _answer(self, text: str) -> str:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        return text


class ReasoningTracker:
    """Follows one sequence's raw token bytes for the engine: phase, `count` (reasoning text
    tokens, markers excluded), `reasoning_tokens` (every token before the answer, markers
    included) and the end marker to force once `count >= cap`.

    Bytes, not ids: a marker is seen however it was tokenised, at its last token. A token is
    counted once one of its bytes is known not to belong to the end marker, so a token that
    might start the marker is counted a step late. `cap` 0 closes a block at once (in MAYBE,
    right after the model opens it).
    """

    __slots__ = (
        "fmt",
        "phase",
        "cap",
        "count",
        "reasoning_tokens",
        "_start",
        "_answer",
        "_end",
        "_head",
        "_tail",
        "_pending",
        "_owed",
        "_n",
        "_counted",
        "_sent",
    )

    def __init__(self, fmt: ReasoningFormat, phase: Phase, cap: int | None = None):
        if cap is not None and cap < 0:
            raise ValueError("the reasoning cap must be >= 0")
        self.fmt, self.phase, self.cap = fmt, phase, cap
        self.count = 0
        self.reasoning_tokens = 0
        self._start = fmt.start.encode()
        self._answer = fmt.answer_start.encode()
        self._end = fmt.end.encode()
        self._head = bytearray()  # MAYBE: bytes after leading whitespace
        self._tail: list[tuple[int, int]] = []  # (byte, token no.) that may begin the end marker
        self._pending = 0  # MAYBE tokens, reasoning if the block opens
        self._owed = 0  # continuation bytes the last UTF-8 character still needs
        self._n = 0  # tokens fed
        self._counted = 0  # token no. last counted in `count`
        self._sent = 0  # end marker tokens already forced in a row

    def forced(self) -> int | None:
        """The token the engine must emit next (the end marker, one id a step), or None."""
        ids = self.fmt.end_ids
        if self.cap is None or self.phase is not Phase.REASONING or not ids:
            return None
        if self._sent:
            return ids[self._sent] if self._sent < len(ids) else None
        if self.count < self.cap or self._owed:  # never cut a UTF-8 character in two
            return None
        return ids[0]

    def feed(self, token: int, raw: bytes | Sequence[int]) -> None:
        """Advance by one generated token and its raw bytes (`TokenBytes(token)[1]`)."""
        self._n += 1
        if self.phase is Phase.ANSWER:
            return
        if self.phase is Phase.REASONING and self.forced() is not None:
            ok = token == self.fmt.end_ids[self._sent]
            self._sent = self._sent + 1 if ok else 0
        if self.phase is Phase.MAYBE:
            self._pending += 1
        else:
            self.reasoning_tokens += 1
        for b in bytes(raw):
            self._owed = 0 if b < 0x80 else (self._owed - 1 if b < 0xC0 else _lead_owes(b))
            self._owed = max(self._owed, 0)
            if self.phase is Phase.MAYBE:
                self._maybe_byte(b)
            elif self.phase is Phase.REASONING:
                self._reasoning_byte(b)
            else:
                return

    def _maybe_byte(self, b: int) -> None:
        if not self._head and b in b" \t\r\n":
            return
        self._head.append(b)
        head = bytes(self._head)
        if head == self._start:
            self.phase = Phase.REASONING
            self.reasoning_tokens += self._pending
        elif head == self._answer or not (
            self._start.startswith(head) or (self._answer and self._answer.startswith(head))
        ):
            self.phase = Phase.ANSWER
        else:
            return
        self._pending = 0
        self._head.clear()

    def _reasoning_byte(self, b: int) -> None:
        tail = self._tail
        tail.append((b, self._n))
        while tail and not self._end.startswith(bytes(x for x, _ in tail)):
            _, no = tail.pop(0)  # known to be reasoning text
            if no != self._counted:
                self.count += 1
                self._counted = no
        if len(tail) == len(self._end):
            self.phase, self._sent = Phase.ANSWER, 0
            tail.clear()


def _lead_owes(b: int) -> int:
    return 1 if b < 0xE0 else 2 if b < 0xF0 else 3


# --- grammar: the reasoning prefix in front of a constraint (llguidance Lark) ---------------

_REGEX_SPECIAL = set("\\.^$*+?{}[]|()/")


def _lark(parts: Sequence[Part]) -> str:
    # Added tokens as <[id]>: a quoted "</think>" is masked out when it is an added token.
    return " ".join(f"<[{p}]>" if isinstance(p, int) else json.dumps(p) for p in parts)


def _regex_escape(text: str) -> str:
    return "".join("\\n" if c == "\n" else ("\\" + c if c in _REGEX_SPECIAL else c) for c in text)


def prefix_lark(fmt: ReasoningFormat, phase: Phase) -> str | None:
    """The Lark grammar of the text allowed before `@answer` (the request's constraint), or
    None when no reasoning can come first (phase ANSWER)."""
    if phase is Phase.ANSWER:
        return None
    rules = []
    end = list(fmt.end_parts)
    if end and isinstance(end[0], int):
        body = "REASONING? " + _lark(end)
        rules.append("REASONING: /(.|\\n)+/")
    else:  # a text end marker: reasoning is the shortest text that ends with it
        first = str(end.pop(0)) if end else fmt.end
        body = "think" + (" " + _lark(end) if end else "")
        rules.append(f"think[lazy]: /(.|\\n)*{_regex_escape(first)}/")
    if not fmt.answer_start:
        body += " WS"
        rules.append("WS: /[ \\t\\r\\n]*/")
    if phase is Phase.REASONING:
        start = f"start: {body} @answer"
    elif fmt.answer_start:  # harmony: a channel header always comes first
        start = f"start: ({_lark(fmt.start_parts)} {body} | {_lark(fmt.answer_parts)}) @answer"
    else:
        start = f"start: ({_lark(fmt.start_parts)} {body})? @answer"
    return "\n".join([start, *rules]) + "\n"


def compose(inner: str, prefix: str) -> str:
    """A grammar that is `prefix` (from `prefix_lark`) followed by `inner` (a serialized
    llguidance grammar: Lark text or a TopLevelGrammar JSON), named `answer`."""
    s = inner.lstrip()
    subs = json.loads(s)["grammars"] if s.startswith("{") else [{"lark_grammar": inner}]
    subs[0] = dict(subs[0], name="answer")
    return json.dumps({"grammars": [{"name": "reasoning", "lark_grammar": prefix}] + subs})
