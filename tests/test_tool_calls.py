"""Tool-call parsing (all formats, any chunking) and the grammars that force calls."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from mlxtg.worker.tool_calls import (
    FORMATS,
    ParsedDelta,
    detect_format,
    make_parser,
)
from mlxtg.worker.tool_grammar import forces_call, tool_call_grammar, validate_tools

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 10},
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 4},
                    "maxItems": 3,
                },
                "exact": {"type": "boolean"},
                "opts": {
                    "type": "object",
                    "properties": {"k": {"type": "number"}},
                    "required": ["k"],
                    "additionalProperties": False,
                },
            },
            "required": ["query", "opts"],
            "additionalProperties": False,
        },
    },
}
NOW: dict[str, Any] = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, SEARCH, NOW]


# --- helpers -------------------------------------------------------------------------------


def splits(text: str, seed: int) -> list[str]:
    """`text` cut at random points (seeded); seed 0 means one character per chunk."""
    if seed == 0:
        return list(text)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(fmt: str, chunks: list[str], stream: bool = True) -> dict[str, Any]:
    """Feed chunks; check the delta protocol; return content, calls and `called`."""
    parser = make_parser(fmt, TOOLS, stream_arguments=stream)
    deltas: list[ParsedDelta] = [parser.feed(c) for c in chunks] + [parser.finish()]
    calls: dict[int, list[str]] = {}
    for d in deltas:
        assert len({t.index for t in d.tool_calls}) == len(d.tool_calls)  # one piece per call
        for t in d.tool_calls:
            if t.index not in calls:
                assert t.id is not None and t.id.startswith("call_") and len(t.id) == 29
                assert t.name
                assert t.index == len(calls)
                calls[t.index] = [t.name, ""]
            else:
                assert t.id is None and t.name is None
            calls[t.index][1] += t.arguments
    valid = [(c.name, c.arguments) for c in parser.calls]
    for _, args in valid:
        assert isinstance(json.loads(args), dict)
    assert parser.called == bool(valid)
    return {
        "content": "".join(d.content for d in deltas),
        "streamed": [tuple(v) for v in calls.values()],
        "calls": valid,
    }


def check_all_splits(fmt: str, text: str) -> dict[str, Any]:
    """Whole feed, 1-char feed and random feeds agree, in both modes; returns the result."""
    whole = run(fmt, [text], stream=False)
    if whole["calls"]:
        assert whole["streamed"] == whole["calls"]  # one piece per call, only valid ones
    else:
        assert whole["streamed"] == [] and whole["content"] == text  # nothing lost
    streamed_whole = run(fmt, [text])
    for seed in range(15):
        assert run(fmt, splits(text, seed), stream=False) == whole, seed
        assert run(fmt, splits(text, seed)) == streamed_whole, seed
    return whole


def hermes(name: str, args: Any, sep: str = "\n") -> str:
    body = args if isinstance(args, str) else json.dumps(args)
    return f'<tool_call>{sep}{{"name": "{name}", "arguments": {body}}}{sep}</tool_call>'


# --- hermes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!\n\n",
        "  a < b and c <tool d <tool_cal> e </tool_call> f\n",
        "<tool_",
        "",
        " \n ",
    ],
)
def test_plain_text_passes_through_verbatim(text: str) -> None:
    for fmt in FORMATS:
        res = check_all_splits(fmt, text) if text else run(fmt, [text])
        assert res == {"content": text, "streamed": [], "calls": []}


def test_hermes_calls_with_text_around() -> None:
    a1 = '{"city": "Oslo", "days": 3}'
    a2 = '{\n  "query": "caf\\u00e9 \\"x\\" é",\n  "opts": {"k": -1.5e-3}, "tags": []\n}'
    text = "Let me check.\n\n" + hermes("get_weather", a1) + "\n" + hermes("search", a2) + "\nDone."
    res = check_all_splits("hermes", text)
    assert res["content"] == "Let me check.\n\nDone."
    assert res["calls"] == [("get_weather", a1), ("search", a2)]
    assert run("hermes", [text])["streamed"] == res["calls"]


def test_hermes_only_calls_has_no_content() -> None:
    text = hermes("now", {}) + "\n" + hermes("get_weather", {"city": "Oslo"}) + "\n"
    res = check_all_splits("hermes", text)
    assert res["content"] == ""
    assert res["calls"] == [("now", "{}"), ("get_weather", '{"city": "Oslo"}')]


def test_arguments_stream_incrementally() -> None:
    parser = make_parser("hermes", TOOLS)
    text = hermes("get_weather", {"city": "Oslo", "days": 3})
    pieces = [parser.feed(c) for c in text] + [parser.finish()]
    fragments = [t.arguments for p in pieces for t in p.tool_calls if t.arguments]
    assert len(fragments) > 10  # char by char, not in one piece at the end
    first = next(t for p in pieces for t in p.tool_calls)
    # the announcing piece already carries the arguments text available (here the brace)
    assert (first.index, first.name, first.arguments) == (0, "get_weather", "{")
    assert first.id is not None and first.id.startswith("call_")
    assert parser.calls[0].to_wire()["function"]["arguments"] == "".join(fragments)


def test_fragments_reach_clients_in_openai_shape() -> None:
    from mlxtg.gateway.format import openai_fragment
    from mlxtg.protocol import ToolCallFragment

    assert openai_fragment(ToolCallFragment(0, "call_1", "get_weather", "{")) == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{"},
    }
    assert openai_fragment(ToolCallFragment(0, arguments='{"a')) == {
        "index": 0,
        "function": {"arguments": '{"a'},
    }


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_weather", "arguments": [1, 2]}',  # arguments not an object
        '{"name": "get_weather", "arguments": "not json"}',
        '{"name": 7, "arguments": {}}',
        '{"arguments": {"city": "Oslo"}}',  # no name
        '{"name": "get_weather", "arguments": {"city": Oslo}}',  # invalid JSON
        '{"name": "get_weather", "arguments": {"city": "Oslo",}}',
        '{"name": "a", "name": "b", "arguments": {}}',
        '{"name": "get_weather", "arguments": {"city": "Os',  # unterminated
        '{"name": "get_weather", "argu',
        "get_weather(city='Oslo')",
        '{"name": "get_weather", "arguments": x}',  # a value that cannot start
        '{"name": ]',
        '{"name": "x", "arguments": {"n": NaN}}',
        '{"name": "x", "arguments": {"n": 01}}',
    ],
)
def test_malformed_calls_become_content(body: str) -> None:
    text = f"Sure.\n<tool_call>\n{body}\n</tool_call> ok"
    res = check_all_splits("hermes", text)
    assert res == {"content": text, "streamed": [], "calls": []}


def test_broken_call_after_announcement_keeps_rest_as_content() -> None:
    text = 'A <tool_call>{"name": "get_weather", "arguments": {"city": "Os" x}}</tool_call>'
    res = run("hermes", list(text))
    assert res["streamed"] == [("get_weather", '{"city": "Os" ')]
    assert res["calls"] == [] and res["content"] == "A x}}</tool_call>"


@pytest.mark.parametrize(
    ("body", "args"),
    [
        ('{"name": "now"}', "{}"),  # no arguments
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', '{"city": "Oslo"}'),
        ('{"arguments": {"city": "Oslo"}, "name": "get_weather"}', '{"city": "Oslo"}'),
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}', '{"city": "Oslo"}'),  # no "}"
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', '{"city": "Oslo"}'),
        ('{"name": "get_weather", "arguments": {}, "id": 1}', "{}"),
    ],
)
def test_lenient_forms(body: str, args: str) -> None:
    res = check_all_splits("hermes", f"<tool_call>\n{body}\n</tool_call>")
    assert res["content"] == "" and len(res["calls"]) == 1 and res["calls"][0][1] == args


def test_unknown_tool_names_are_reported() -> None:
    res = check_all_splits("hermes", hermes("launch_rockets", {"n": 1}))
    assert res["calls"] == [("launch_rockets", '{"n": 1}')]


def test_unclosed_tag_and_trailing_text() -> None:
    text = hermes("now", {}).removesuffix("</tool_call>") + "</tool_"
    assert check_all_splits("hermes", text)["content"] == "</tool_"
    res = check_all_splits("hermes", '<tool_call>{"name": "now", "arguments": {}} and more')
    assert res["calls"] == [("now", "{}")] and res["content"] == "and more"


# --- llama3_json / mistral ------------------------------------------------------------------


def test_llama3_json() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for text in (call, " \n" + call, "<|python_tag|>" + call, call + "; " + call + ";"):
        res = check_all_splits("llama3_json", text)
        assert res["content"] == "" and res["calls"][0] == ("get_weather", '{"city": "Oslo"}')
    assert len(check_all_splits("llama3_json", call + ";\n" + call)["calls"]) == 2
    res = check_all_splits("llama3_json", "Sure: <|python_tag|>" + call + "\nDone")
    assert res["content"] == "Sure: Done" and len(res["calls"]) == 1
    for text in ('{"answer": 42}', "I think " + call, '{"name": "x"} trailing {'):
        res = check_all_splits("llama3_json", text)
        assert res["calls"] == [] or text.startswith('{"name": "x"}')
    assert check_all_splits("llama3_json", '{"answer": 42}')["content"] == '{"answer": 42}'


def test_mistral() -> None:
    a = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    b = '{"name": "now", "arguments": {}}'
    for text in (
        f"[TOOL_CALLS][{a}, {b}]",
        f"[TOOL_CALLS] [ {a} ,\n{b} ]",
        f"[TOOL_CALLS][{a}, {b}",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]now[ARGS]{}',
    ):
        res = check_all_splits("mistral", text)
        assert res["calls"] == [("get_weather", '{"city": "Oslo"}'), ("now", "{}")], text
        assert res["content"] == ""
    res = check_all_splits("mistral", f"Checking.[TOOL_CALLS]{a}")
    assert res["content"] == "Checking." and len(res["calls"]) == 1
    for text in (
        "[TOOL_CALLS] nope",
        "[TOOL_CALLS][1, 2]",
        "[TOOL_CALLS]bad name[ARGS]{}",
        "[TOOL_CALLS]f[ARGS][1]",
        "[TOOL_CALLS]f[AR",
        "[TOOL_CALLS]",
    ):
        assert check_all_splits("mistral", text)["content"] == text
    res = check_all_splits("mistral", f"[TOOL_CALLS][{a}, oops]")
    assert res["calls"] == [("get_weather", '{"city": "Oslo"}')] and res["content"] == ", oops]"


# --- random round trips ----------------------------------------------------------------------


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([0, -7, 12345, 3.25, -0.5e-7, 1e21])
    if kind in (2, 3):
        return "".join(rng.choice('ab "\\/\n\té€😀<>{}[],:') for _ in range(rng.randrange(8)))
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_json(rng, 9): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_random_round_trips() -> None:
    rng = random.Random(1234)
    for _ in range(60):
        fmt = rng.choice(FORMATS)
        calls, pieces = [], []
        for _ in range(rng.randint(1, 3)):
            args = {str(random_json(rng, 9)): random_json(rng) for _ in range(rng.randrange(4))}
            indent = rng.choice([None, 2])
            raw = json.dumps(args, indent=indent, ensure_ascii=rng.random() < 0.5)
            name = rng.choice(["get_weather", "search", "now"])
            calls.append((name, raw))
            key = "parameters" if fmt == "llama3_json" else "arguments"
            pieces.append(f'{{"name": "{name}", "{key}": {raw}}}')
        if fmt == "hermes":
            text = "Intro <b>\n" + "\n".join(f"<tool_call>\n{p}\n</tool_call>" for p in pieces)
        elif fmt == "mistral":
            text = "Intro <b>[TOOL_CALLS][" + ", ".join(pieces) + "]"
        else:
            text = "; ".join(pieces)
        res = check_all_splits(fmt, text)
        assert res["calls"] == calls
        assert res["content"] == ("" if fmt == "llama3_json" else "Intro <b>")
        assert run(fmt, splits(text, 7))["streamed"] == calls


FUZZ_ATOMS = [
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<tool_", "[TOOL",
    "{", "}", "[", "]", '"', "\\", " ", "\n", ";", ": ", ", ", "x", "1", "-", ".5", "e", "true",
    "nul", '"name"', '"f"', '"arguments"', '"parameters"', '{"name": "f", "arguments": {"a": 1}}',
]  # fmt: skip


def test_fuzzed_markup() -> None:
    """Random soup of tags and JSON pieces: no crash, any chunking gives the same result, and
    text without a valid call comes back verbatim."""
    rng = random.Random(99)
    for _ in range(150):
        text = "".join(rng.choice(FUZZ_ATOMS) for _ in range(rng.randint(2, 30)))
        for fmt in FORMATS:
            whole = run(fmt, [text], stream=False)
            empty_list = fmt == "mistral" and re.search(r"\[TOOL_CALLS\]\s*\[\s*\]", text)
            if not whole["calls"] and not empty_list:  # `[TOOL_CALLS][]` is dropped
                assert whole["content"] == text
            streamed = run(fmt, [text])
            for seed in range(3):
                assert run(fmt, splits(text, seed), stream=False) == whole
                assert run(fmt, splits(text, seed)) == streamed


# --- format detection and construction ------------------------------------------------------


def test_detect_format() -> None:
    assert detect_format("{% for t in tools %}<tool_call>{% endfor %}", {}) == "hermes"
    assert detect_format(None, {"[TOOL_CALLS]": 5, "a": 1}) == "mistral"
    assert detect_format("{{ '[TOOL_CALLS]' }}", []) == "mistral"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|>", []) == "llama3_json"
    assert detect_format(None, {"<|python_tag|>"}) == "llama3_json"
    # a Hermes fine-tune of Llama keeps <|python_tag|> in its vocabulary
    assert detect_format("<tool_call>", {"<|python_tag|>", "<tool_call>"}) == "hermes"
    assert detect_format(None, ()) == "hermes"


def test_make_parser_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        make_parser("xml", TOOLS)


# --- grammar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ({"type": "function"}, "must be a list"),
        ([{"type": "function", "function": {"parameters": {}}}], "name"),
        ([{"type": "function", "function": {"name": "a b"}}], "name"),
        ([{"type": "code_interpreter"}], "function"),
        ([NOW, NOW], "more than one"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "schema object"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "object",
        ),
    ],
)
def test_validate_tools_rejects(tools: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_tools(tools)


def test_grammar_errors() -> None:
    validate_tools(TOOLS)
    assert forces_call("required") and forces_call({"type": "function"})
    assert not forces_call("auto") and not forces_call("none")
    with pytest.raises(ValueError, match="'nope', which is not in tools"):
        tool_call_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}})
    flat = tool_call_grammar(TOOLS, {"type": "function", "name": "now"})  # Responses API form
    assert "now" in flat and "get_weather" not in flat
    with pytest.raises(ValueError, match="tool_choice must be"):
        tool_call_grammar(TOOLS, {"type": "function"})
    with pytest.raises(ValueError, match="does not call tools"):
        tool_call_grammar(TOOLS, "none")
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_grammar([], "required")
    with pytest.raises(ValueError, match="format"):
        tool_call_grammar(TOOLS, "required", "xml")
    bad = {
        "type": "function",
        "function": {
            "name": "bad",
            "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
        },
    }
    with pytest.raises(ValueError, match="tool 'bad' is not supported"):
        tool_call_grammar([NOW, bad], "required")


class Sampler:
    """Random completions under a grammar's token masks: random logits, with a bias towards
    closing punctuation so that strings and arrays end soon."""

    def __init__(self, tokenizer: Any) -> None:
        import llguidance.hf
        import numpy as np

        self.tokenizer = tokenizer
        self.llt = llguidance.hf.from_tokenizer(tokenizer)
        self.bias = np.zeros(self.llt.vocab_size)
        for i in range(self.llt.vocab_size):
            piece = tokenizer.decode([i])
            if piece and set(piece) <= set('"]},'):
                self.bias[i] = 3.0

    def __call__(self, grammar: str, n: int, seed: int, prefix: str = "") -> list[str]:
        """`n` random completions of `prefix` (which the grammar must accept) under `grammar`."""
        import numpy as np
        from llguidance import LLMatcher

        llt, vocab, bias = self.llt, self.llt.vocab_size, self.bias
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            m = LLMatcher(llt, grammar, log_level=0)
            assert not m.is_error(), m.get_error()
            tokens: list[int] = self.tokenizer.encode(prefix, add_special_tokens=False)
            assert m.consume_tokens(tokens), m.get_error()
            while not m.is_stopped():
                assert len(tokens) < 500
                bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
                allowed = np.unpackbits(bits, bitorder="little")[:vocab].astype(bool)
                logits = np.where(allowed, rng.standard_normal(vocab) + bias, -np.inf)
                token = int(np.argmax(logits))
                if token == llt.eos_token:
                    assert m.is_accepting()
                    break
                assert m.consume_token(token), m.get_error()
                tokens.append(token)
            out.append(self.tokenizer.decode(tokens))
        return out


@pytest.fixture(scope="module")
def samplers() -> dict[str, Sampler]:
    """Small byte-level BPE tokenizers: without added tags, and with them as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = [
        "get_weather",
        "search",
        "now",
        "city",
        "Oslo",
        "query",
        "tags",
        "opts",
        "celsius",
        "true",
        "false",
        "name",
        "arguments",
        "parameters",
        "the",
        "a",
    ]
    corpus = []
    for _ in range(1500):
        corpus.append(" ".join(rng.choice(words) for _ in range(6)))
        args = {rng.choice(words): rng.choice([rng.randint(-99, 999), rng.choice(words)])}
        corpus.append(hermes(rng.choice(words), args))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=2000,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tagged = PreTrainedTokenizerFast(
        tokenizer_object=tok.__class__.from_str(tok.to_str()), eos_token="<|endoftext|>"
    )
    tagged.add_tokens(["<tool_call>", "</tool_call>", "[ARGS]"])
    tagged.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    return {"plain": Sampler(plain), "tagged": Sampler(tagged)}


@pytest.mark.parametrize(
    ("fmt", "variant"),
    [
        ("hermes", "plain"),
        ("hermes", "tagged"),
        ("llama3_json", "plain"),
        ("mistral", "plain"),
        ("mistral", "tagged"),
    ],
)
def test_grammar_samples_parse_as_valid_calls(
    samplers: dict[str, Sampler], fmt: str, variant: str
) -> None:
    from jsonschema import Draft202012Validator

    sampler = samplers[variant]
    added = sampler.tokenizer.get_added_vocab() if variant == "tagged" else None
    schemas = {
        t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS
    }
    cases: list[tuple[Any, int]] = [
        ("required", 40),
        ({"type": "function", "function": {"name": "search"}}, 15),
    ]
    seen: set[str] = set()
    multi = 0
    for seed, (choice, n) in enumerate(cases):
        grammar = tool_call_grammar(TOOLS, choice, fmt, added_tokens=added)
        for text in sampler(grammar, n, seed):
            res = run(fmt, splits(text, seed + 1)) if len(text) > 2 else run(fmt, [text])
            assert res["content"] == "" and res["calls"], text
            assert res["streamed"] == res["calls"]
            if choice != "required":
                assert [c[0] for c in res["calls"]] == ["search"]
            multi += len(res["calls"]) > 1
            for name, args in res["calls"]:
                assert name in schemas
                Draft202012Validator(schemas[name]).validate(json.loads(args))
                seen.add(name)
    assert seen == set(schemas) and multi > 0  # every tool, and parallel calls, sampled
    single = tool_call_grammar(
        TOOLS, "required", fmt, added_tokens=added, parallel_tool_calls=False
    )
    for text in sampler(single, 10, 99):
        assert len(run(fmt, [text])["calls"]) == 1


@pytest.mark.parametrize(
    ("fmt", "variant", "opener"),
    [
        ("hermes", "plain", "<tool_call>"),
        ("hermes", "tagged", "<tool_call>"),
        ("llama3_json", "plain", ""),
        ("mistral", "plain", "[TOOL_CALLS]"),
        ("mistral", "tagged", "[TOOL_CALLS]"),
    ],
)
def test_auto_grammar_is_free_until_a_call_opens(
    samplers: dict[str, Sampler], fmt: str, variant: str, opener: str
) -> None:
    """tool_choice "auto": text is free, but once the model opens a call in its format the
    rest must be valid calls to the declared tools (issue 11, item 7)."""
    from jsonschema import Draft202012Validator
    from llguidance import LLMatcher

    sampler = samplers[variant]
    added = sampler.tokenizer.get_added_vocab() if variant == "tagged" else None
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in TOOLS}
    grammar = tool_call_grammar(TOOLS, "auto", fmt, added_tokens=added)
    for text in ("", "the weather in Oslo, celsius", "a\nsearch the query"):
        m = LLMatcher(sampler.llt, grammar, log_level=0)
        assert m.consume_tokens(sampler.tokenizer.encode(text, add_special_tokens=False))
        assert m.is_accepting(), (text, m.get_error())  # a reply of text only may end
    lead = "" if fmt == "llama3_json" else "the city now "
    start = "{" if fmt == "llama3_json" else lead + opener
    texts = sampler(grammar, 25, 7, prefix=start)
    for text in texts:
        res = run(fmt, [text])
        assert res["content"].strip() == lead.strip(), text
        assert res["calls"], text
        for name, args in res["calls"]:
            Draft202012Validator(schemas[name]).validate(json.loads(args))
    # Text that spells the opener (or, for llama3_json, starts with "{") must go on as a
    # call: a malformed call is not reachable.
    m = LLMatcher(sampler.llt, grammar, log_level=0)
    bad = sampler.tokenizer.encode(start + 'nonsense"', add_special_tokens=False)
    assert not m.consume_tokens(bad)
