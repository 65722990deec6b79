"""A lower bound on a text's token count from its length alone (issue 14, item 3), so the
worker refuses a prompt of megabytes that cannot fit the context in microseconds instead of
tokenising it for minutes."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import cache
from typing import Any

# Every character Python calls whitespace: a superset of what an added token's lstrip or
# rstrip may swallow (Rust's char::is_whitespace); tests check it against str.isspace.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Pre-tokenizers that split text without dropping any of it (Split unless "Removed").
_KEEPING_PRE = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}
# Normalizers that never make a text shorter (Replace: one character by a non-empty string).
_GROWING_NORM = {"NFD", "NFKD", "Prepend", "Lowercase", "Replace"}


@dataclass(slots=True, frozen=True)
class LengthBound:
    """A lower bound on a text's token count from its length alone, so a prompt of
    megabytes is refused in microseconds instead of being tokenised for minutes.

    Each token covers at most `per_token` characters of the text: the longest string in
    the vocabulary (added and special tokens included; byte-level strings count bytes, which
    is at least the characters they encode), times how many characters NFC/NFKC may compose
    into one. So C characters are at least ceil(C / per_token) tokens. That holds only for
    tokenizers that keep every character: byte-level BPE or byte fallback, normalizers that
    compose at most, pre-tokenizers that split without dropping. `of` returns None for any
    other tokenizer (WordPiece, unknown-token models, Strip or Precompiled normalizers...).
    """

    per_token: int
    # Some added token strips whitespace beside it (lstrip/rstrip), however long the run:
    # only the other characters count.
    strips_whitespace: bool = False

    def min_tokens(self, text: str) -> int:
        chars = len(text)
        if self.strips_whitespace:
            chars -= sum(map(text.count, WHITESPACE))
        return -(-chars // self.per_token)

    @classmethod
    def of(cls, hf_tokenizer: Any) -> LengthBound | None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (pure Python) tokenizer: nothing to inspect
            return None
        spec = json.loads(backend.to_str())
        vocab = backend.get_vocab(with_added_tokens=True)
        pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
        if not vocab or not _keeps_every_char(spec.get("model") or {}, pre, vocab):
            return None
        if any(p.get("type") not in _KEEPING_PRE or p.get("behavior") == "Removed" for p in pre):
            return None
        composes = 1
        for norm in _parts(spec.get("normalizer"), "normalizers"):
            kind = norm.get("type")
            if kind in ("NFC", "NFKC"):
                composes *= _longest_decomposition()
            elif kind not in _GROWING_NORM or (kind == "Replace" and not _one_char_replace(norm)):
                return None
        added = spec.get("added_tokens") or []
        strips = any(t.get("lstrip") or t.get("rstrip") for t in added)
        return cls(max(map(len, vocab)) * composes, strips)


def _parts(component: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A tokenizer.json component as a flat list (a Sequence holds its parts under `key`)."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return [p for c in component.get(key) or [] for p in _parts(c, key)]
    return [component]


def _keeps_every_char(
    model: dict[str, Any], pre: list[dict[str, Any]], vocab: dict[str, int]
) -> bool:
    """Whether the model turns every character into at least one token of its own."""
    if model.get("byte_fallback"):
        return True
    if model.get("type") != "BPE":
        return False  # WordPiece maps a whole word to [UNK]; Unigram fuses unknown runs
    if any(p.get("type") == "ByteLevel" for p in pre):
        from tokenizers.pre_tokenizers import ByteLevel

        return all(ch in vocab for ch in ByteLevel.alphabet())
    # An unknown character becomes one unknown token, unless runs of them are fused.
    return bool(model.get("unk_token")) and not model.get("fuse_unk")


def _one_char_replace(norm: dict[str, Any]) -> bool:
    pattern = norm.get("pattern") or {}
    return len(pattern.get("String") or "") == 1 and bool(norm.get("content"))


@cache
def _longest_decomposition() -> int:
    """How many characters NFC or NFKC may compose into one (4 in Unicode 15): the NFD of
    any character is at most this long."""
    return max(len(unicodedata.normalize("NFD", chr(c))) for c in range(0x110000))
