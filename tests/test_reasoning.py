"""worker/reasoning.py: format detection, initial phase, the text splitter, the byte tracker
and the grammar prefix, on tokenizers built here with real reasoning templates
(tests/reasoning_models.py) and the installed mlx-lm and llguidance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from reasoning_models import build_reasoning_model, build_reasoning_tokenizer
from tiny_model import CHATML

from mlxtg.protocol.specs import ConstraintKind, GuidedSpec
from mlxtg.worker.reasoning import (
    Phase,
    ReasoningFormat,
    ReasoningSplitter,
    ReasoningTracker,
    compose,
    detect,
    initial_phase,
    prefix_lark,
)
from mlxtg.worker.text import TokenBytes

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}},
    "required": ["a"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "hi"}]


def _load(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _wrap(hf: Any) -> Any:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return TokenizerWrapper(hf)


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """HF tokenizers: think-token styles, harmony, [THINK], and no added markers."""
    root = tmp_path_factory.mktemp("reasoning_toks")
    specs: dict[str, dict[str, Any]] = {
        "qwen3": {"style": "qwen3"},
        "qwen3_special": {"style": "qwen3", "special": True},
        "r1": {"style": "r1"},
        "harmony": {"style": "harmony", "special": True},
        "bracket": {"style": "r1", "added": ("[THINK]", "[/THINK]"), "template": CHATML},
        "text": {"style": "qwen3", "added": ()},  # </think> only in the template
        "plain": {"style": "qwen3", "added": (), "template": CHATML},
    }
    return {k: _load(build_reasoning_tokenizer(root / k, **v)) for k, v in specs.items()}


@pytest.fixture(scope="module")
def fmts(toks: dict[str, Any]) -> dict[str, ReasoningFormat]:
    out = {k: detect(_wrap(toks[k])) for k in ("qwen3", "r1", "harmony", "text")}
    assert all(out.values())
    return out  # type: ignore[return-value]


# --- detection -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3", "qwen3_special", "r1"])
def test_detect_think_tokens_wrapper_and_bare_hf(toks: dict[str, Any], name: str) -> None:
    hf = toks[name]
    wrapper = _wrap(hf)
    assert wrapper.has_thinking and wrapper.think_start_tokens == (1020,)
    for tok in (wrapper, hf):
        fmt = detect(tok)
        assert fmt is not None
        assert (fmt.name, fmt.start, fmt.end) == ("think", "<think>", "</think>")
        assert (fmt.start_ids, fmt.end_ids) == ((1020,), (1021,))
        assert (fmt.start_parts, fmt.end_parts, fmt.answer_start) == ((1020,), (1021,), "")
        assert str(fmt) == "think(<think>,</think>)"


def test_detect_bracket_tags(toks: dict[str, Any]) -> None:
    fmt = detect(_wrap(toks["bracket"]))
    assert fmt is not None and (fmt.start, fmt.end) == ("[THINK]", "[/THINK]")
    assert (fmt.start_ids, fmt.end_ids) == ((1022,), (1023,))


def test_detect_harmony(toks: dict[str, Any]) -> None:
    hf = toks["harmony"]
    v = hf.get_added_vocab()
    ch, msg, end, start = v["<|channel|>"], v["<|message|>"], v["<|end|>"], v["<|start|>"]
    for tok in (_wrap(hf), hf):
        fmt = detect(tok)
        assert fmt is not None and fmt.name == "harmony"
        assert fmt.start_parts == (ch, "analysis", msg)
        assert fmt.end_parts == (end, start, "assistant", ch, "final", msg)
        assert fmt.answer_parts == (ch, "final", msg)
        assert fmt.end_ids[:2] == (end, start) and fmt.end_ids[-1] == msg
        assert hf.decode(list(fmt.end_ids)) == fmt.end
    assert detect(hf, "harmony") == detect(hf)


def test_detect_text_tags_from_template(toks: dict[str, Any]) -> None:
    hf = toks["text"]
    fmt = detect(_wrap(hf))
    assert fmt is not None and (fmt.start, fmt.end) == ("<think>", "</think>")
    assert fmt.start_parts == ("<think>",) and fmt.end_parts == ("</think>",)
    assert len(fmt.end_ids) > 1 and hf.decode(list(fmt.end_ids)) == "</think>"


def test_detect_none_and_explicit_settings(toks: dict[str, Any]) -> None:
    plain, qwen3 = toks["plain"], toks["qwen3"]
    assert detect(_wrap(plain)) is None and detect(plain) is None
    assert detect(qwen3, "none") is None
    forced = detect(plain, "think")  # no markers anywhere: text <think> tags
    assert forced is not None and forced.end_parts == ("</think>",)
    tags = detect(qwen3, tags=("<seed:think>", "</seed:think>"))
    assert tags is not None and (tags.start, tags.end) == ("<seed:think>", "</seed:think>")
    assert tags.end_parts == ("</seed:think>",)  # no such added token
    # A tag that contains an added token is spelled with it.
    mixed = detect(qwen3, tags=("<think>", "</think>\n"))
    assert mixed is not None and mixed.end_parts == (1021, "\n")
    with pytest.raises(ValueError, match="reasoning_parser"):
        detect(qwen3, "deepseek")
    with pytest.raises(ValueError, match="harmony"):
        detect(qwen3, "harmony")
    with pytest.raises(ValueError, match="reasoning_tags"):
        detect(qwen3, tags=("<think>", ""))


# --- initial phase -------------------------------------------------------------------------


def _render(hf: Any, messages: list[dict[str, Any]] = USER, **kwargs: Any) -> str:
    text = _wrap(hf).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert isinstance(text, str)
    return text


def test_initial_phase_per_template(toks: dict[str, Any], fmts: dict[str, ReasoningFormat]) -> None:
    assert initial_phase(fmts["qwen3"], _render(toks["qwen3"])) is Phase.MAYBE
    off = _render(toks["qwen3"], enable_thinking=False)
    assert off.endswith("<think>\n\n</think>\n\n")
    assert initial_phase(fmts["qwen3"], off) is Phase.ANSWER
    r1 = _render(toks["r1"])
    assert r1.endswith("<think>\n") and initial_phase(fmts["r1"], r1) is Phase.REASONING
    assert initial_phase(fmts["harmony"], _render(toks["harmony"])) is Phase.MAYBE
    # The text-tag tokenizer renders the same templates.
    assert initial_phase(fmts["text"], _render(toks["text"], enable_thinking=False)) is Phase.ANSWER


def test_initial_phase_with_history(toks: dict[str, Any], fmts: dict[str, ReasoningFormat]) -> None:
    call = {"function": {"name": "f", "arguments": "{}"}}
    loop: list[dict[str, Any]] = USER + [
        {"role": "assistant", "content": "", "reasoning_content": "hm", "tool_calls": [call]},
        {"role": "tool", "content": "42"},
    ]
    text = _render(toks["qwen3"], loop)
    assert "<think>\nhm\n</think>" in text  # kept inside a tool loop
    assert initial_phase(fmts["qwen3"], text) is Phase.MAYBE
    chat = USER + [{"role": "assistant", "content": "<think>x</think>yes"}] + USER
    assert initial_phase(fmts["r1"], _render(toks["r1"], chat)) is Phase.REASONING
    harmony = fmts["harmony"]
    assert initial_phase(harmony, "<|start|>assistant<|channel|>final<|message|>") is Phase.ANSWER
    # Only the prompt's end counts: a block long before it opens nothing.
    assert initial_phase(fmts["r1"], "<think>" + "x" * 300) is Phase.MAYBE


# --- splitter ------------------------------------------------------------------------------


def _run(fmt: ReasoningFormat, phase: Phase, chunks: list[str]) -> tuple[str, str]:
    s = ReasoningSplitter(fmt, phase)
    reasoning, answer = [], []
    for c in chunks:
        r, a = s.feed(c)
        reasoning.append(r)
        answer.append(a)
    r, a = s.finish()
    assert s.phase is not Phase.MAYBE
    return "".join(reasoning + [r]), "".join(answer + [a])


def _every_split(fmt: ReasoningFormat, phase: Phase, text: str) -> tuple[str, str]:
    """The split of `text` fed whole, one char at a time, and cut at every point (and at
    every pair of points for short texts); all must agree."""
    whole = _run(fmt, phase, [text])
    assert _run(fmt, phase, list(text)) == whole
    n = len(text)
    for i in range(n + 1):
        assert _run(fmt, phase, [text[:i], text[i:]]) == whole, i
        if n <= 40:
            for j in range(i, n + 1):
                assert _run(fmt, phase, [text[:i], text[i:j], text[j:]]) == whole, (i, j)
    return whole


THINK_CASES = [
    # (initial phase, output, reasoning, answer)
    (Phase.MAYBE, "<think>\nhm ok\n</think>\n\nthe answer", "hm ok", "the answer"),
    (Phase.MAYBE, " \n<think>x</think>y", "x", "y"),
    (Phase.MAYBE, "hello <think>x</think>y", "", "hello <think>x</think>y"),  # not at the start
    (Phase.MAYBE, " hello", "", " hello"),  # no block: the text as it came
    (Phase.MAYBE, "<thi", "", "<thi"),  # a partial marker that never completed
    (Phase.MAYBE, "<think>", "", ""),
    (Phase.MAYBE, "<think></think>", "", ""),
    (Phase.MAYBE, "<tool_call>{}</tool_call>", "", "<tool_call>{}</tool_call>"),
    (Phase.REASONING, "hm\nok  \n</think>\n\nans\n", "hm\nok", "ans\n"),
    (Phase.REASONING, "\n a < b </thin x</think>y", "a < b </thin x", "y"),
    (Phase.REASONING, "a</think>b</think>c", "a", "b</think>c"),
    (Phase.REASONING, "<think>a</think>b", "<think>a", "b"),  # no nesting
    (Phase.REASONING, "  cut by length  ", "cut by length", ""),
    (Phase.REASONING, "cut at </thi", "cut at </thi", ""),
    (Phase.REASONING, "</think>", "", ""),
    (Phase.ANSWER, "\n\nhello </think> x", "", "hello </think> x"),
]


@pytest.mark.parametrize(("phase", "text", "reasoning", "answer"), THINK_CASES)
def test_splitter_think(
    fmts: dict[str, ReasoningFormat], phase: Phase, text: str, reasoning: str, answer: str
) -> None:
    for name in ("qwen3", "text"):  # added tokens or text tags: the same text either way
        assert _every_split(fmts[name], phase, text) == (reasoning, answer)


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        (
            "<|channel|>analysis<|message|>hm ok<|end|><|start|>assistant"
            '<|channel|>final<|message|>{"a":1}',
            "hm ok",
            '{"a":1}',
        ),
        ('<|channel|>final<|message|>{"a":1}', "", '{"a":1}'),
        ("<|channel|>analysis<|message|>cut", "cut", ""),
        ("plain", "", "plain"),
    ],
)
def test_splitter_harmony(
    fmts: dict[str, ReasoningFormat], text: str, reasoning: str, answer: str
) -> None:
    assert _every_split(fmts["harmony"], Phase.MAYBE, text) == (reasoning, answer)


def test_splitter_streams_without_delay_or_leaks(fmts: dict[str, ReasoningFormat]) -> None:
    s = ReasoningSplitter(fmts["r1"], Phase.REASONING)
    assert s.feed("\nfirst") == ("first", "")  # emitted at once
    assert s.feed(" two \n") == (" two", "")  # whitespace held: it may precede </think>
    assert s.feed("</") == ("", "")
    assert s.feed("b") == (" \n</b", "")  # not a marker after all
    assert s.feed("</think>") == ("", "")
    assert s.phase is Phase.ANSWER
    assert s.feed("\n") == ("", "")
    assert s.feed(" x ") == ("", "x ")
    assert s.finish() == ("", "")


# --- tracker -------------------------------------------------------------------------------


def _drive(
    tracker: ReasoningTracker, tb: TokenBytes, script: list[int], steps: int = 100
) -> list[int]:
    """Generate: the forced token when there is one, else the script's next token."""
    out: list[int] = []
    it = iter(script)
    for _ in range(steps):
        forced = tracker.forced()
        tok = forced if forced is not None else next(it, None)
        if tok is None:
            break
        tracker.feed(tok, tb(tok)[1])
        out.append(tok)
    return out


def _ids(hf: Any, text: str) -> list[int]:
    return list(hf.encode(text, add_special_tokens=False))


def test_tracker_counts_without_cap(toks: dict[str, Any], fmts: dict[str, ReasoningFormat]) -> None:
    hf = toks["r1"]
    tb = TokenBytes(hf)
    words = _ids(hf, "the quick brown fox")
    t = ReasoningTracker(fmts["r1"], Phase.REASONING)
    _drive(t, tb, words + [1021] + _ids(hf, "\n\nok"))
    assert (t.phase, t.count, t.reasoning_tokens) == (Phase.ANSWER, len(words), len(words) + 1)
    assert t.forced() is None
    # MAYBE: the model's own <think> and leading whitespace count as reasoning tokens.
    t = ReasoningTracker(fmts["qwen3"], Phase.MAYBE)
    _drive(t, tb, _ids(hf, "\n") + [1020] + words + [1021, 269])
    assert (t.phase, t.count, t.reasoning_tokens) == (Phase.ANSWER, len(words), len(words) + 3)
    # MAYBE without a block: nothing is reasoning.
    t = ReasoningTracker(fmts["qwen3"], Phase.MAYBE, cap=0)
    _drive(t, tb, _ids(hf, "\n hello") + [1020])
    assert (t.phase, t.count, t.reasoning_tokens) == (Phase.ANSWER, 0, 0)


@pytest.mark.parametrize("cap", [0, 1, 3])
def test_tracker_cap_single_token_marker(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat], cap: int
) -> None:
    hf = toks["r1"]
    tb = TokenBytes(hf)
    words = _ids(hf, "the quick brown fox jumps over a lazy dog")
    t = ReasoningTracker(fmts["r1"], Phase.REASONING, cap=cap)
    out = _drive(t, tb, words)
    assert out[: cap + 1] == words[:cap] + [1021] and t.phase is Phase.ANSWER
    assert (t.count, t.reasoning_tokens) == (cap, cap + 1)  # design: cap 3 -> 4
    t = ReasoningTracker(fmts["qwen3"], Phase.MAYBE, cap=cap)
    out = _drive(t, tb, [1020] + words)
    assert out[: cap + 2] == [1020] + words[:cap] + [1021]
    assert (t.count, t.reasoning_tokens) == (cap, cap + 2)  # design: cap 3 -> 5


@pytest.mark.parametrize("name", ["text", "harmony"])
def test_tracker_forces_multi_token_marker(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat], name: str
) -> None:
    hf, fmt = toks[name], fmts[name]
    tb = TokenBytes(hf)
    words = _ids(hf, "the quick brown fox jumps")
    assert len(fmt.end_ids) > 1
    phase = Phase.REASONING
    t = ReasoningTracker(fmt, phase, cap=2)
    out = _drive(t, tb, words)
    assert out[: 2 + len(fmt.end_ids)] == words[:2] + list(fmt.end_ids)
    assert t.phase is Phase.ANSWER
    assert (t.count, t.reasoning_tokens) == (2, 2 + len(fmt.end_ids))
    # A marker the model writes itself is not reasoning text.
    t = ReasoningTracker(fmt, phase)
    _drive(t, tb, words + list(fmt.end_ids) + words)
    assert (t.phase, t.count, t.reasoning_tokens) == (
        Phase.ANSWER,
        len(words),
        len(words) + len(fmt.end_ids),
    )


def test_tracker_forced_queue_restarts(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat]
) -> None:
    hf, fmt = toks["text"], fmts["text"]
    tb = TokenBytes(hf)
    ends = list(fmt.end_ids)
    t = ReasoningTracker(fmt, Phase.REASONING, cap=0)
    assert t.forced() == ends[0]
    t.feed(ends[0], tb(ends[0])[1])
    assert t.forced() == ends[1]
    other = _ids(hf, "x")[0]  # the engine could not force it (grammar): something else came
    t.feed(other, tb(other)[1])
    assert t.forced() == ends[0]
    for tok in ends:
        assert t.forced() == tok
        t.feed(tok, tb(tok)[1])
    assert t.phase is Phase.ANSWER and t.forced() is None


def test_tracker_waits_for_a_whole_utf8_character(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat]
) -> None:
    hf = toks["r1"]
    tb = TokenBytes(hf)
    lead, cont = hf.convert_tokens_to_ids(["Ã", "©"])  # byte-level 0xC3, 0xA9: "é"
    assert tb(lead)[1] == [0xC3] and tb(cont)[1] == [0xA9]
    t = ReasoningTracker(fmts["r1"], Phase.REASONING, cap=1)
    t.feed(lead, tb(lead)[1])
    assert t.count == 1 and t.forced() is None  # half a character
    t.feed(cont, tb(cont)[1])
    assert t.count == 2 and t.forced() == 1021
    # Three-byte characters owe two bytes.
    t = ReasoningTracker(fmts["r1"], Phase.REASONING, cap=0)
    for b in "日".encode()[:2]:
        t.feed(0, [b])
        assert t.forced() is None
    t.feed(0, "日".encode()[2:])
    assert t.forced() == 1021


def test_tracker_counts_a_possible_marker_late(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat]
) -> None:
    hf = toks["text"]
    tb = TokenBytes(hf)
    t = ReasoningTracker(fmts["text"], Phase.REASONING, cap=1)
    lt = _ids(hf, "<")[0]
    t.feed(lt, tb(lt)[1])
    assert t.count == 0 and t.forced() is None  # "<" may open </think>
    x = _ids(hf, "x")[0]
    t.feed(x, tb(x)[1])
    assert t.count == 2  # it did not
    with pytest.raises(ValueError):
        ReasoningTracker(fmts["text"], Phase.REASONING, cap=-1)


def test_tracker_answer_phase_is_inert(fmts: dict[str, ReasoningFormat]) -> None:
    t = ReasoningTracker(fmts["r1"], Phase.ANSWER, cap=0)
    t.feed(1021, b"</think>")
    assert (t.phase, t.count, t.reasoning_tokens, t.forced()) == (Phase.ANSWER, 0, 0, None)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_special"])
def test_detokenizer_splitter_and_tracker_agree(toks: dict[str, Any], name: str) -> None:
    """mlx-lm's streaming detokenizer writes added markers as text (special or not), so the
    splitter sees what the tracker sees in bytes."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

    hf = toks[name]
    fmt = detect(hf)
    assert fmt is not None
    tb, detok = TokenBytes(hf), TokenizerWrapper(hf, BPEStreamingDetokenizer).detokenizer
    ids = [1020] + _ids(hf, "\nthe fox ") + [1021] + _ids(hf, "\n\nhello world")
    splitter, tracker = ReasoningSplitter(fmt, Phase.MAYBE), ReasoningTracker(fmt, Phase.MAYBE)
    detok.reset()
    parts: list[tuple[str, str]] = []
    for i in ids:
        detok.add_token(i)
        parts.append(splitter.feed(detok.last_segment))
        tracker.feed(i, tb(i)[1])
        assert tracker.phase is splitter.phase
    detok.finalize()
    parts += [splitter.feed(detok.last_segment), splitter.finish()]
    assert ("".join(r for r, _ in parts), "".join(a for _, a in parts)) == (
        "the fox",
        "hello world",
    )
    assert tracker.reasoning_tokens == len(_ids(hf, "\nthe fox ")) + 2


# --- grammar prefix ------------------------------------------------------------------------


def test_prefix_lark_text(fmts: dict[str, ReasoningFormat]) -> None:
    assert prefix_lark(fmts["r1"], Phase.ANSWER) is None
    r = prefix_lark(fmts["r1"], Phase.REASONING)
    assert r is not None and r.startswith("start: REASONING? <[1021]> WS @answer\n")
    m = prefix_lark(fmts["qwen3"], Phase.MAYBE)
    assert m is not None and m.startswith("start: (<[1020]> REASONING? <[1021]> WS)? @answer\n")
    t = prefix_lark(fmts["text"], Phase.REASONING)
    assert t is not None and "think[lazy]: /(.|\\n)*<\\/think>/" in t


@pytest.fixture(scope="module")
def compilers(toks: dict[str, Any]) -> dict[str, Any]:
    from mlxtg.worker.guided import GuidedCompiler

    return {k: GuidedCompiler(toks[k], vocab_size=1024) for k in ("r1", "text", "harmony")}


def _state(compiler: Any, grammar: str) -> Any:
    import llguidance as llg

    from mlxtg.worker.guided import GuideState

    m = llg.LLMatcher(compiler.lltok, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return GuideState(compiler, GuidedSpec(ConstraintKind.GRAMMAR, grammar), m)


def _inner(kind: ConstraintKind, value: str) -> str:
    from mlxtg.worker.guided import _grammar

    schema = json.loads(value) if kind is ConstraintKind.JSON else None
    return _grammar(GuidedSpec(kind, value), schema)


def _feed(state: Any, ids: list[int]) -> None:
    for i in ids:
        assert state.mask()[i], (i, state.spec.value[:80])
        state.consume(i)


def test_compose_json_after_reasoning(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat], compilers: dict[str, Any]
) -> None:
    hf, fmt, compiler = toks["r1"], fmts["r1"], compilers["r1"]
    prefix = prefix_lark(fmt, Phase.REASONING)
    assert prefix is not None
    state = _state(compiler, compose(_inner(ConstraintKind.JSON, json.dumps(SCHEMA)), prefix))
    mask = state.mask()
    text = [i for i in range(1020) if (p := hf.convert_ids_to_tokens(i)).isascii() and p.isalpha()]
    assert mask[text].all() and mask[1021]  # free text and </think>
    assert not mask[2] and not mask[1] and not mask[1020]  # EOS, specials, a nested <think>
    _feed(state, _ids(hf, "hm, {json} later") + [1021])
    mask = state.mask()
    assert not mask[2] and not mask[_ids(hf, "hm")[0]]
    assert mask[_ids(hf, "{")[0]] and mask[_ids(hf, "\n")[0]]  # JSON, or whitespace first
    assert int(mask.sum()) < 20
    _feed(state, _ids(hf, '\n\n{"a":1'))
    assert not state.eos_allowed()
    _feed(state, _ids(hf, "}"))
    assert state.eos_allowed()
    _feed(state, [2])
    assert state.is_finished()


def test_compose_maybe_and_other_inner_grammars(
    toks: dict[str, Any], compilers: dict[str, Any]
) -> None:
    hf, compiler = toks["r1"], compilers["r1"]
    fmt = detect(toks["qwen3"])  # same vocab as r1's, the model opens the block
    assert fmt is not None
    prefix = prefix_lark(fmt, Phase.MAYBE)
    assert prefix is not None
    json_inner = _inner(ConstraintKind.JSON, json.dumps(SCHEMA))
    for ids in (
        [1020] + _ids(hf, "\nhm\n") + [1021] + _ids(hf, '\n\n{"a":1}') + [2],
        _ids(hf, '{"a":1}') + [2],
        [1020, 1021] + _ids(hf, '{"a":1}') + [2],
    ):
        state = _state(compiler, compose(json_inner, prefix))
        assert not state.mask()[2] and not state.mask()[1021]
        _feed(state, ids)
        assert state.is_finished()
    lark = 'start: item ("," item)*\nitem: "x" | "y"\n'
    cases = [
        (ConstraintKind.GRAMMAR, lark, "x,y", "z"),
        (ConstraintKind.REGEX, "[0-9]{3}", "123", "a"),
        (ConstraintKind.CHOICE, '["yes", "no"]', "no", "x"),
    ]
    for kind, value, good, bad in cases:
        state = _state(compiler, compose(_inner(kind, value), prefix))
        _feed(state, [1020] + _ids(hf, "think about it") + [1021])
        assert not state.mask()[_ids(hf, bad)[0]]
        _feed(state, _ids(hf, good) + [2])
        assert state.is_finished()


def test_compose_tool_grammar(toks: dict[str, Any], fmts: dict[str, ReasoningFormat]) -> None:
    from mlxtg.worker.guided import GuidedCompiler
    from mlxtg.worker.tool_grammar import tool_call_grammar

    hf = toks["qwen3"]
    compiler = GuidedCompiler(hf, vocab_size=1024)
    prefix = prefix_lark(fmts["r1"], Phase.REASONING)
    assert prefix is not None
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    inner = tool_call_grammar(tools, "required", "hermes", added_tokens=hf.get_added_vocab())
    state = _state(compiler, compose(inner, prefix))
    _feed(state, _ids(hf, "call it") + [1021])
    mask = state.mask()
    call = hf.get_added_vocab()["<tool_call>"]
    assert mask[call] and not mask[2] and not mask[_ids(hf, "hm")[0]]
    body = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "oslo"}}\n</tool_call>'
    _feed(state, _ids(hf, body))
    assert state.eos_allowed()


def test_compose_text_tags_and_harmony(
    toks: dict[str, Any], fmts: dict[str, ReasoningFormat], compilers: dict[str, Any]
) -> None:
    json_inner = _inner(ConstraintKind.JSON, json.dumps(SCHEMA))
    hf, fmt = toks["text"], fmts["text"]
    for phase, text in [
        (Phase.REASONING, 'hm < ok</think>\n{"a":1}'),
        (Phase.MAYBE, '<think>hm</think>\n{"a":1}'),
        (Phase.MAYBE, '{"a":1}'),
    ]:
        prefix = prefix_lark(fmt, phase)
        assert prefix is not None
        state = _state(compilers["text"], compose(json_inner, prefix))
        assert not state.mask()[2]
        _feed(state, _ids(hf, text) + [2])
        assert state.is_finished()
    hf, fmt = toks["harmony"], fmts["harmony"]
    eos = hf.get_added_vocab()["<|return|>"]
    compiler = compilers["harmony"]
    prefix = prefix_lark(fmt, Phase.MAYBE)
    assert prefix is not None
    for text in [
        "<|channel|>analysis<|message|>hm ok<|end|><|start|>assistant"
        '<|channel|>final<|message|>{"a":1}',
        '<|channel|>final<|message|>{"a":1}',
    ]:
        state = _state(compiler, compose(json_inner, prefix))
        _feed(state, _ids(hf, text) + [eos])
        assert state.is_finished()
    state = _state(compiler, compose(json_inner, prefix))
    assert not state.mask()[_ids(hf, "{")[0]]  # a channel header comes first


def test_compose_keeps_named_subgrammars() -> None:
    inner = json.dumps(
        {"grammars": [{"lark_grammar": "start: @x"}, {"name": "x", "lark_grammar": 'start: "a"'}]}
    )
    out = json.loads(compose(inner, "P"))["grammars"]
    assert [g.get("name") for g in out] == ["reasoning", "answer", "x"]
    assert out[0]["lark_grammar"] == "P" and out[1]["lark_grammar"] == "start: @x"
    assert json.loads(compose('start: "a"', "P"))["grammars"][1] == {
        "lark_grammar": 'start: "a"',
        "name": "answer",
    }


@pytest.mark.parametrize(("style", "eos"), [("qwen3", "<|im_end|>"), ("harmony", "<|return|>")])
def test_reasoning_models_load(tmp_path: Path, style: str, eos: str) -> None:
    """The builders later step and e2e tests use: mlx-lm loads them, with the style's EOS."""
    from mlx_lm import load

    model, tok = load(str(build_reasoning_model(tmp_path / style, style)))
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids(eos)}
    assert model.args.vocab_size == len(tok._tokenizer) == 1024
    fmt = detect(tok)
    assert fmt is not None and fmt.name == ("harmony" if style == "harmony" else "think")
