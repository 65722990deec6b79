"""Guided decoding (structured output): token masks from llguidance.

The gateway makes the `GuidedSpec` (mlxtg/constraints.py; heavy imports here are lazy). A
`GuidedCompiler` (cached) makes a `GuideState` per sequence; each step `fill_masks` computes
all guided rows at once (GIL released), `apply_masks` applies them, then `consume`. JSON is
compact by default: a weak model allowed free whitespace can emit it forever. For a
reasoning model the constraint holds after the thinking: the grammar is the reasoning
prefix (reasoning.prefix_lark) followed by the constraint as an `@answer` sub-grammar.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..constraints import GuidedError, load_schema, spec_from_request
from ..protocol import ConstraintKind, GuidedSpec
from .reasoning import compose

__all__ = ["GuidedCompiler", "GuidedError", "GuidedSpec", "GuideState", "spec_from_request"]

if TYPE_CHECKING:
    import llguidance
    import mlx.core as mx
    import numpy as np
    from llguidance._lib import JsonCompileOptions

_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})  # data, not subschemas
_MAX_ERROR_CHARS = 600
_STATS = ("compiles", "cache_hits", "compile_errors", "compile_ms_total", "compile_ms_max")


def _strip_format(node: Any, fmt: str) -> Any:
    """Copy of a schema without `"format": fmt` (format is an annotation in JSON Schema;
    llguidance refuses formats it does not know, e.g. OpenAPI's int32 or pydantic's password)."""
    if isinstance(node, list):
        return [_strip_format(x, fmt) for x in node]
    if not isinstance(node, dict):
        return node
    return {
        k: (v if k in _DATA_KEYS else _strip_format(v, fmt))
        for k, v in node.items()
        if not (k == "format" and v == fmt)
    }


def _compact_inline_json(lark: str, opts: Mapping[str, Any]) -> str:
    """Give every `%json {...}` in a Lark grammar our JSON options (unless it has its own
    "x-guidance"), so tool-call grammars are compact like plain JSON schemas."""
    out, pos, dec = [], 0, json.JSONDecoder()
    for m in re.finditer(r"%json\s*", lark):
        if m.start() < pos:
            continue
        try:
            obj, end = dec.raw_decode(lark, m.end())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "x-guidance" not in obj:
            obj = {"x-guidance": opts, **obj}
            out += [lark[pos : m.end()], json.dumps(obj, ensure_ascii=False)]
            pos = end
    return "".join(out) + lark[pos:]


def _grammar(spec: GuidedSpec, schema: dict[str, Any] | None) -> str:
    """The llguidance grammar (serialized) for a spec; JSON kinds pass the parsed schema."""
    import llguidance as llg
    from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax

    # coerce_one_of: pydantic unions emit oneOf, which llguidance otherwise refuses; with
    # distinct discriminators anyOf is equivalent.
    opts: JsonCompileOptions = {"whitespace_flexible": False, "coerce_one_of": True}
    if spec.whitespace_pattern is not None:
        opts["whitespace_pattern"] = spec.whitespace_pattern
    if schema is not None:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=opts)
    if spec.kind == "regex":  # \d means [0-9]: Unicode digits would surprise every client
        return llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(spec.value, 'd')}/")
    if spec.kind == "choice":
        choices = json.loads(spec.value)
        # JSON string escapes are valid Lark string literals.
        lark = "start: " + " | ".join(json.dumps(c) for c in choices)
        return llg.LLMatcher.grammar_from_lark(lark)
    text = spec.value
    if "::=" in text and not is_lark_syntax(text):
        try:
            text = gbnf_to_lark(text)
        except Exception as e:  # the converter raises its own error types
            raise GuidedError(f"invalid GBNF grammar: {e}", spec.param) from None
    return llg.LLMatcher.grammar_from_lark(_compact_inline_json(text, opts))


def _describe(spec: GuidedSpec, err: str) -> str:
    err = err.strip()
    if m := re.search(r"Unimplemented keys: \[(.*?)\]", err):
        keys = m.group(1).replace('"', "")
        return f"JSON schema keyword(s) not supported for guided decoding: {keys}"
    text = f"invalid {'JSON schema' if spec.kind.startswith('json') else spec.kind}: {err}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


class GuidedCompiler:
    """Compiles specs to llguidance matchers for one tokenizer, with an LRU cache.

    A cached entry is a pristine matcher; each new state is a cheap `deep_copy` of it, so a
    repeated schema costs ~0. Errors are cached too (a bad schema retried stays cheap).
    `vocab_size` is the model's logits width; rows past the tokenizer's vocab are never allowed.
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        eos_token_ids: list[int] | None = None,
        cache_size: int = 256,
        num_threads: int | None = None,
    ):
        import llguidance as llg
        import numpy as np
        from llguidance.hf import from_tokenizer

        inner: Any = getattr(hf_tokenizer, "_tokenizer", None)
        wrapped = hasattr(inner, "backend_tokenizer")  # mlx_lm's TokenizerWrapper around HF's
        hf = inner if wrapped else hf_tokenizer
        if eos_token_ids is None:
            eos_token_ids = sorted(hf_tokenizer.eos_token_ids) if wrapped else [hf.eos_token_id]
        try:  # n_vocab: llguidance sizes masks to the logits, pad rows never allowed
            self.lltok = from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos_token_ids)
        except ValueError:  # logits narrower than the tokenizer: masks are cut to vocab_size
            self.lltok = from_tokenizer(hf, eos_token=eos_token_ids)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._stats: dict[str, float] = dict.fromkeys(_STATS, 0)
        self._words = (self.lltok.vocab_size + 31) // 32
        # Bits for ids the tokenizer really has; ANDed into every mask to exclude pad rows.
        valid = np.arange(self._words * 32) < min(len(hf), vocab_size)
        self._valid = np.packbits(valid, bitorder="little").view(np.int32)
        self._limits = llg.LLParserLimits(verbose_errors=False)  # no grammar dumps in errors
        self._executor = llg.LLExecutor(num_threads)
        self._lock = threading.Lock()
        # Keyed by what changes the grammar (not `param`); the tokenizer is fixed per compiler.
        self._cached = functools.lru_cache(maxsize=cache_size)(self._compile)

    @property
    def stats(self) -> dict[str, float]:
        """Counters for a metrics endpoint: compiles, cache hits, errors, compile ms."""
        hits = self._stats["cache_hits"] + self._cached.cache_info().hits
        return {**self._stats, "cache_hits": hits}

    def _matcher(self, spec: GuidedSpec, prefix: str | None) -> llguidance.LLMatcher:
        hit = self._cached(spec.kind, spec.value, spec.whitespace_pattern, prefix)
        if isinstance(hit, str):
            raise GuidedError(hit, spec.param)
        return hit

    def _compile(
        self,
        kind: ConstraintKind,
        value: str,
        whitespace_pattern: str | None,
        prefix: str | None = None,
    ) -> Any:
        """A pristine matcher, or the error message as a str. `prefix`: the Lark grammar of
        a reasoning block the constraint comes after (None: the constraint alone)."""
        import llguidance as llg

        spec = GuidedSpec(kind, value, "", whitespace_pattern)
        t0 = time.perf_counter()
        result: Any
        try:
            is_json = kind in ("json", "json_object")
            schema = load_schema(value or '{"type":"object"}', "") if is_json else None
            for _ in range(10):  # each pass drops one format llguidance does not know
                grammar = _grammar(spec, schema)
                if prefix is not None:
                    grammar = compose(grammar, prefix)
                m = llg.LLMatcher(self.lltok, grammar, log_level=0, limits=self._limits)
                err = m.get_error() if m.is_error() else ""
                unknown = re.search(r"Unknown format: (\S+)", err)
                if schema is None or not unknown:
                    break
                schema = _strip_format(schema, unknown.group(1))
            result = _describe(spec, err) if err else m
        except GuidedError as e:
            result = e.message
        except ValueError as e:  # llguidance's own argument checks
            result = _describe(spec, str(e))
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            st = self._stats
            st["compiles"] += 1
            st["compile_errors"] += isinstance(result, str)
            st["compile_ms_total"] += ms
            st["compile_ms_max"] = max(st["compile_ms_max"], ms)
        return result

    def validate(self, spec: GuidedSpec, prefix: str | None = None) -> None:
        """Compile (and cache) now; raise GuidedError before any generation starts."""
        self._matcher(spec, prefix)

    def new_state(self, spec: GuidedSpec, prefix: str | None = None) -> GuideState:
        """A fresh constraint state for one generated sequence (after a reasoning block
        when `prefix` is given)."""
        return GuideState(self, spec, self._matcher(spec, prefix).deep_copy())

    def clear_cache(self) -> None:
        """Forget every compiled grammar (benchmarks; tokenizer swaps build a new compiler)."""
        with self._lock:
            self._stats["cache_hits"] += self._cached.cache_info().hits  # keep it monotonic
            self._cached.cache_clear()

    def fill_bitmask(self, states: list[GuideState]) -> np.ndarray:
        """Packed masks, int32 (len(states), ceil(V/32)), bit i of word w = token 32*w + i.
        Releases the GIL while llguidance works, so it can overlap the model's forward pass."""
        import llguidance.numpy as lln
        import numpy as np

        bits = np.zeros((len(states), self._words), dtype=np.int32)
        if states:
            pairs = [(s._m, i) for i, s in enumerate(states)]
            lln.fill_next_token_bitmask_par(self._executor, pairs, bits)
        bits &= self._valid
        return bits

    def fill_masks(self, states: list[GuideState]) -> np.ndarray:
        """Bool masks (len(states), vocab_size): True = token allowed next."""
        return unpack_bitmask(self.fill_bitmask(states), self.vocab_size)

    def batch_masks(self, guides: list[GuideState | None]) -> np.ndarray:
        """Bool masks (B, vocab_size) for a whole batch; rows without a guide are all True."""
        import numpy as np

        rows = [i for i, g in enumerate(guides) if g is not None]
        out = np.ones((len(guides), self.vocab_size), dtype=bool)
        if rows:
            out[rows] = self.fill_masks([g for g in guides if g is not None])
        return out


class GuideState:
    """Constraint state of one generated sequence (one choice)."""

    __slots__ = ("_compiler", "_m", "spec")

    def __init__(self, compiler: GuidedCompiler, spec: GuidedSpec, matcher: Any):
        self._compiler = compiler
        self._m = matcher
        self.spec = spec

    def mask(self) -> np.ndarray:
        """Bool (vocab_size,): the tokens allowed next."""
        return self._compiler.fill_masks([self])[0]

    def consume(self, token_id: int) -> None:
        """Advance by one sampled token; GuidedError if the constraint rejects it."""
        if not self._m.consume_token(int(token_id)):
            err = self._m.get_error().replace("<non-verbose/>", "").strip()
            msg = f"token {int(token_id)} violates the {self.spec.kind} constraint: {err}"
            raise GuidedError(msg, self.spec.param)

    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or EOS was consumed): stop with finish_reason "stop"."""
        return bool(self._m.is_stopped())

    def eos_allowed(self) -> bool:
        """The output so far is complete, so EOS is in the mask."""
        return bool(self._m.is_accepting())


def unpack_bitmask(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """Packed int32 (n, W) masks -> bool (n, vocab_size); columns past 32*W are False."""
    import numpy as np

    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little", count=vocab_size).view(
        bool
    )


def apply_masks(logits: mx.array, rows: list[int], masks: np.ndarray) -> mx.array:
    """Set disallowed logits to -inf for the guided `rows` of `logits` (B, V) or (B, L, V).

    `masks` is bool (len(rows), V') or packed int32 (len(rows), W) from `fill_bitmask`
    (32x less to copy; unpacked inside the MLX graph). Unguided rows are untouched; mask
    columns missing for V are disallowed."""
    import mlx.core as mx
    import numpy as np

    if not rows:
        return logits
    batch, vocab = logits.shape[0], logits.shape[-1]
    packed = masks.dtype != np.bool_
    width = (vocab + 31) // 32 if packed else vocab
    full = np.full((batch, width), -1 if packed else True, dtype=masks.dtype)
    w = min(width, masks.shape[1])
    full[rows, w:] = 0
    full[rows, :w] = masks[:, :w]
    allowed = mx.array(full)
    if packed:  # unpack in the graph: bit i of word w is token 32*w + i
        bits = (allowed[:, :, None] >> mx.arange(32, dtype=allowed.dtype)) & 1
        allowed = bits.reshape(batch, width * 32)[:, :vocab].astype(mx.bool_)
    if logits.ndim == 3:
        allowed = allowed[:, None, :]
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
