"""Streaming text out of token ids: incremental detokenisation, reasoning split, stop
strings, token bytes.

mlx-lm's streaming detokenizers already hold back incomplete UTF-8 sequences; on top of
that `TextStream` holds back any tail that could still become a stop string, so a stop
string is never emitted, and cuts the text where one appears. For a reasoning model a
`ReasoningSplitter` first takes the reasoning off the text: stop strings apply to the
answer only (a `stop: "\n\n"` must not end the thinking).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .reasoning import ReasoningSplitter


class TextStream:
    """Detokenises one sequence token by token and applies its stop strings.

    `token_bytes` (a `TokenBytes`) is given when the text continues a prompt (completions):
    mlx-lm's streaming detokenizers drop the first token's leading space, as decoding a
    whole reply does, which would glue " ready" onto "life is" as "ready". Chat replies keep
    mlx-lm's behaviour (no leading space), as mlx_lm.server does.
    """

    __slots__ = (
        "_detok",
        "_stops",
        "_pending",
        "stopped",
        "matched",
        "_bytes",
        "_space",
        "trims_first_space",
        "_split",
        "_reasoning",
    )

    def __init__(
        self,
        detokenizer: Any,
        stops: list[str],
        token_bytes: Any = None,
        splitter: ReasoningSplitter | None = None,
    ):
        self._detok = detokenizer
        self._split = splitter
        self._reasoning = ""  # reasoning text not yet taken
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self._bytes = None  # set while the first token with bytes is awaited
        self._space = False  # the first text still owes its leading space
        # Chat: the detokenizer drops the reply's first leading space, so the first
        # logprobs entry must drop it too for the entries to join to the text.
        self.trims_first_space = token_bytes is None and (
            bool(getattr(detokenizer, "trim_space", False))
            or type(detokenizer).__name__ == "BPEStreamingDetokenizer"
        )
        if token_bytes is not None:
            if hasattr(detokenizer, "trim_space"):  # SentencePiece: trimming is optional
                detokenizer.trim_space = False
            elif type(detokenizer).__name__ == "BPEStreamingDetokenizer":
                # It removes exactly one leading space from the first text it flushes.
                self._bytes = token_bytes

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to emit."""
        if self._bytes is not None:
            raw = self._bytes(token)[1]
            if raw:
                self._space, self._bytes = raw[0] == 0x20, None
        self._detok.add_token(token)
        self._take()
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush everything that is left (minus a stop string)."""
        self._detok.finalize()
        self._take()
        if self._split is not None:
            reasoning, answer = self._split.finish()
            self._reasoning += reasoning
            self._pending += answer
        return self._release(final=True)

    def take_reasoning(self) -> str:
        """The reasoning text split off since the last call (markers removed)."""
        text, self._reasoning = self._reasoning, ""
        return text

    def _take(self) -> None:
        segment = self._detok.last_segment
        if self._space and segment:
            self._space, segment = False, " " + segment
        if self._split is not None and segment:
            reasoning, segment = self._split.feed(segment)
            self._reasoning += reasoning
        self._pending += segment

    def _release(self, final: bool) -> str:
        text = self._pending
        if not self._stops or not text:
            self._pending = ""
            return text
        found = [(i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self._pending = ""
            self.stopped = True
            return text[:cut]
        hold = 0 if final else _longest_stop_prefix_suffix(text, self._stops)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenBytes:
    """Raw bytes and display text of single tokens, for `logprobs` entries."""

    def __init__(self, hf_tokenizer: Any):
        self._tok = hf_tokenizer
        self._pieces: list[str | None] = hf_tokenizer.convert_ids_to_tokens(
            list(range(len(hf_tokenizer)))
        )
        decoder = getattr(getattr(hf_tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self._pieces[token_id] if token_id < len(self._pieces) else None
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            return piece.encode("utf-8")  # an added token such as <|im_end|>
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        if piece.startswith("▁"):
            return (" " + piece[1:]).encode("utf-8")
        return str(self._tok.decode([token_id])).encode("utf-8")
