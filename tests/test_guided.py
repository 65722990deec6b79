"""Guided decoding: masks from llguidance keep random sampling inside the constraint.

A small byte-level BPE is trained in-process (no hub downloads); outputs are produced by
sampling from random logits under the masks, then checked with jsonschema / re / parsers.
"""

# mypy: disable-error-code="arg-type, valid-type"
# (pydantic.create_model's stubs reject Literal/union fields and dynamic models as types)
from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
import zlib
from types import SimpleNamespace
from typing import Any, Literal

import jsonschema
import mlx.core as mx
import msgpack
import numpy as np
import pytest
from pydantic import ConfigDict, Field, create_model

from mlxtg.constraints import GuidedError, spec_from_request
from mlxtg.protocol import Generate, ProtocolError, SamplingParams, decode, encode
from mlxtg.protocol import GuidedSpec as G
from mlxtg.schema_defaults import INT64_MAX, INT64_MIN, with_defaults
from mlxtg.worker import guided
from mlxtg.worker.guided import GuidedCompiler, apply_masks

RF, SO = "response_format", "structured_outputs"


@pytest.fixture(scope="session")
def hf_tok():
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng, corpus = random.Random(0), []
    words = "the name age value true false null weather city get_weather arguments tool_call id "
    vocab = (words + "type object string number hello world street zip cat dog").split()
    for _ in range(1500):  # JSON (compact and indented), prose, numbers, arithmetic
        d = {rng.choice(vocab): rng.choice([rng.randint(-999, 99999), rng.choice(vocab), [1, 2]])}
        corpus.append(json.dumps(d, indent=rng.choice([None, 2])))
        corpus.append(" ".join(rng.choices(vocab, k=8)) + f" {rng.randint(0, 10**6)} + (4 * 7)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=3000, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def compiler(hf_tok):
    return GuidedCompiler(hf_tok, vocab_size=len(hf_tok) + 64)  # pad logits rows, like many models


@pytest.fixture(scope="session")
def bias(hf_tok, compiler):
    """Logit bias towards closing tokens and EOS, so random sampling ends in a few dozen steps."""
    b = np.zeros(compiler.vocab_size)
    b[[i for i in range(len(hf_tok)) if any(c in hf_tok.decode([i]) for c in '"]}),')]] = 4.0
    b[hf_tok.eos_token_id] = 4.0
    return b


def generate(compiler, hf_tok, bias, spec, n=16, seed=0, max_tokens=400) -> list[str]:
    """n samples at temperature 1 from random logits masked batch-wise by `fill_masks`."""
    rng = np.random.default_rng(seed)
    states = [compiler.new_state(spec) for _ in range(n)]
    toks: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_tokens):
        live = [i for i in range(n) if not states[i].is_finished()]
        if not live:
            break
        masks = compiler.fill_masks([states[i] for i in live])
        assert masks.shape == (len(live), compiler.vocab_size)
        assert masks.any(axis=1).all() and not masks[:, len(hf_tok) :].any()
        logits = np.where(masks, rng.standard_normal(masks.shape) + bias, -np.inf)
        drawn = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).tolist()  # softmax draw
        for j, (i, t) in enumerate(zip(live, drawn, strict=True)):
            assert masks[j, t]
            states[i].consume(t)
            toks[i] += [t] if t != hf_tok.eos_token_id else []
    assert all(s.is_finished() for s in states), "sampling did not finish"
    return [hf_tok.decode(t) for t in toks]


def outside_strings(text: str) -> str:
    """The characters of a JSON text that are not inside string literals."""
    return re.sub(r'"(?:\\.|[^"\\])*"', "", text)


STRICT = ConfigDict(extra="forbid")  # additionalProperties: false, as strict mode wants
INT, STR = {"type": "integer"}, {"type": "string"}
# fmt: off
Address = create_model("Address", __config__=STRICT, street=(str, Field(max_length=12)), zip=(str, Field(pattern=r"^\d{5}$")))
Cat = create_model("Cat", __config__=STRICT, kind=(Literal["cat"], ...), lives=(int, Field(ge=1, le=9)))
Dog = create_model("Dog", __config__=STRICT, kind=(Literal["dog"], ...), good=(bool, ...))
Person = create_model(
    "Person", __config__=STRICT, name=(str, Field(max_length=10)), age=(int, Field(ge=0, le=120)),
    addresses=(list[Address], Field(min_length=1, max_length=2)), nickname=(str | None, None),
    pet=(Cat | Dog, Field(discriminator="kind")),  # oneOf + discriminator
)
# fmt: on


def obj(extra: bool = True, **props) -> dict:
    """An object schema requiring all `props`; extra=False forbids other keys."""
    schema = {"type": "object", "properties": props, "required": list(props)}
    return schema if extra else {**schema, "additionalProperties": False}


# fmt: off
SCHEMAS = {
    "nested": obj(user=obj(id=INT, ok={"type": "boolean"}, extra=False), score={"type": "number", "minimum": -1, "maximum": 1}, extra=False),
    "array_bounds": {"type": "array", "items": {**INT, "maximum": 99}, "minItems": 2, "maxItems": 4},
    "enum": obj(unit={"enum": ["celsius", "fahrenheit", 'q"uote']}, n={"enum": [1, 2.5, None]}, extra=False),
    "pydantic_refs": Person.model_json_schema(),
    "any_of": obj(v={"anyOf": [{**STR, "maxLength": 3}, INT, {"type": "null"}]}, extra=False),
    "patterns": obj(date={**STR, "pattern": r"^\d{4}-\d{2}-\d{2}$"}, code={**STR, "pattern": "^[A-Z]{2,3}$"}, when={**STR, "format": "date"}, extra=False),
    "int_bounds": obj(a={**INT, "minimum": -5, "maximum": 5}, b={**INT, "exclusiveMinimum": 100, "exclusiveMaximum": 1000}),
    "unknown_formats": obj(n={**INT, "format": "int32"}, s={**STR, "format": "password"}, extra=False),
}
# fmt: on
ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /0|[1-9][0-9]{0,2}/
"""
GBNF = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z]{1,5} | "#" [0-9]{1,3}\n'
GBNF_RE = r"\((?:[a-z]{1,5}|#[0-9]{1,3})(?:,(?:[a-z]{1,5}|#[0-9]{1,3}))*\)"
TOOL_ARGS = {**obj(city={**STR, "maxLength": 12}, days=INT, extra=False), "required": ["city"]}
TOOL_SCHEMA = obj(name={"const": "get_weather"}, arguments=TOOL_ARGS, extra=False)
TOOL_LARK = f'start: "<tool_call>\\n" %json {json.dumps(TOOL_SCHEMA, indent=1)} "\\n</tool_call>"'
CHOICES = ["yes", "no", 'say "hi"', "naïve 日本", "two\nlines", "a"]
REGEXES = [r"\d{3}-\d{4}", r"[a-z]{1,8}@[a-z]{2,6}\.(com|org)", r"(yes|no)!?", r"[A-F0-9]{8}"]


def check_json(schema: dict, text: str) -> None:
    jsonschema.validate(json.loads(text), schema)
    assert not re.search(r"\s", outside_strings(text)), f"whitespace in compact JSON: {text!r}"


def check_arith(text: str) -> None:
    ok = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    tree = ast.parse(text, mode="eval")
    assert " " not in text and all(isinstance(n, ok) for n in ast.walk(tree)), text


def check_tool(text: str) -> None:
    m = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", text, re.S)
    assert m, text
    check_json(TOOL_SCHEMA, m.group(1))


SAMPLED: dict[str, Any] = {
    **{f"json_{k}": (G("json", json.dumps(v)), lambda t, v=v: check_json(v, t)) for k, v in SCHEMAS.items()},
    "json_object": (G("json_object", "", RF), lambda t: check_json({"type": "object"}, t)),
    **{f"regex_{i}": (G("regex", r), lambda t, r=r: re.fullmatch(r, t) or pytest.fail(t)) for i, r in enumerate(REGEXES)},
    "choice": (spec_from_request({"guided_choice": CHOICES}), lambda t: t in CHOICES or pytest.fail(t)),
    "lark": (G("grammar", ARITH, "guided_grammar"), check_arith),
    "gbnf": (G("grammar", GBNF, "guided_grammar"), lambda t: re.fullmatch(GBNF_RE, t) or pytest.fail(t)),
    "tool_call_lark_with_inline_json": (G("grammar", TOOL_LARK, "tool_choice"), check_tool),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampled_outputs_are_valid(compiler, hf_tok, bias, name):
    spec, check = SAMPLED[name]
    texts = generate(compiler, hf_tok, bias, spec, n=24, seed=zlib.crc32(name.encode()))
    for text in texts:
        check(text)
    assert len(set(texts)) >= 2  # the samples explore the constraint, not one forced string


def test_whitespace_pattern(compiler, hf_tok, bias):
    space, brace = hf_tok.convert_tokens_to_ids(["Ġ", "{"])  # byte-level BPE's space and "{"
    compact = compiler.new_state(G("json", json.dumps(obj(a=INT))))
    spaced = compiler.new_state(G("json", json.dumps(obj(a=INT)), whitespace_pattern=" *"))
    compact.consume(brace)
    spaced.consume(brace)
    assert not compact.mask()[space] and spaced.mask()[space]
    spec = G("json", json.dumps(SCHEMAS["nested"]), whitespace_pattern="[ ]{0,2}")
    texts = generate(compiler, hf_tok, bias, spec, n=24)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])
        assert set(outside_strings(text)) - set("{}[]:,-.0123456789eEtruefalsn") <= {" "}
    assert any(" " in outside_strings(t) for t in texts)


def test_inline_json_options_and_strip_format():
    own = '%json {"x-guidance": {"whitespace_flexible": true}, "type": "object"}'
    lark = 'start: a b\na: %json {"type": "string"}\nb: ' + own + " // %json {bad"
    out = guided._compact_inline_json(lark, {"whitespace_flexible": False})
    assert '%json {"x-guidance": {"whitespace_flexible": false}, "type": "string"}' in out
    assert own in out and out.endswith("// %json {bad")  # explicit options and junk kept
    node = {"format": "x", "const": {"format": "x"}, "items": [{"format": "x", "type": "string"}]}
    want = {"const": {"format": "x"}, "items": [{"type": "string"}]}
    assert guided._strip_format(node, "x") == want


# fmt: off
INVALID = [(G("json", json.dumps(obj(x=v)), RF), rf"not supported.*\b{k}\b") for k, v in {
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if": {"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "null"}},
    "contains": {"type": "array", "contains": INT},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^a"}},
}.items()] + [  # unsupported keywords above are named in the message; other errors below
    (G("regex", "a(b", "guided_regex"), "unclosed group"),
    (G("regex", "(?<=a)b", "guided_regex"), "look-around"),
    (G("grammar", "start: foo", "guided_grammar"), "unknown name"),
    (G("grammar", 'root ::= ( "a"', "guided_grammar"), "GBNF"),
    (G("json", '{"type": "strin"}'), "Invalid type"),
    (G("json", '{"type": '), "not valid JSON"),
    (G("json", "[1]"), "must be a JSON object"),
    (G("json", '{"$ref": "http://example.com/s.json"}'), "does not fetch"),
    (G("json", '{"$ref": "#/$defs/nope"}'), "does not exist"),
]
# fmt: on


@pytest.mark.parametrize(("spec", "match"), INVALID)
def test_invalid_constraints_raise(compiler, spec, match):
    with pytest.raises(GuidedError, match=match) as e:
        compiler.validate(spec)
    assert e.value.param == spec.param
    assert "<grammar>" not in e.value.message and len(e.value.message) < 700


SCHEMA = obj(b=INT, a=STR)  # property order is kept (not sorted) in the spec text
ST = json.dumps(with_defaults(SCHEMA), separators=(",", ":"))  # closed, int64-bounded
JS = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"guided_json": SCHEMA}, G("json", ST, "guided_json")),
        ({"guided_json": json.dumps(SCHEMA, indent=2)}, G("json", ST)),
        ({"guided_regex": r"\d+"}, G("regex", r"\d+", "guided_regex")),
        ({"guided_choice": ["a", "b"]}, G("choice", '["a", "b"]', "guided_choice")),
        ({"guided_grammar": ARITH}, G("grammar", ARITH, "guided_grammar")),
        ({RF: {"type": "text"}}, None),
        ({RF: {"type": "json_object"}}, G("json_object", "", RF)),
        ({RF: JS}, G("json", ST, RF)),
        ({RF: {"type": "json_schema", "json_schema": {"name": "x"}}}, G("json_object", "", RF)),
        ({SO: {"json": SCHEMA}}, G("json", ST, SO)),
        ({SO: {"regex": "a+"}}, G("regex", "a+", SO)),
        ({SO: {"choice": ["x"]}}, G("choice", '["x"]', SO)),
        ({SO: {"grammar": ARITH}}, G("grammar", ARITH, SO)),
        ({SO: {"json_object": True, "json": None}}, G("json_object", "", SO)),
        ({RF: JS, "guided_whitespace_pattern": " ?"}, G("json", ST, RF, " ?")),
        ({SO: {"json": SCHEMA, "whitespace_pattern": "\n?"}}, G("json", ST, SO, "\n?")),
        ({"guided_json": None, RF: None, "guided_regex": "x"}, G("regex", "x", "guided_regex")),
    ],
)
def test_spec_from_request_spellings(body, expected):
    assert spec_from_request(body) == expected
    assert expected is None or sent(expected) == expected


def sent(spec: G) -> G | None:
    """The spec as the worker decodes it from a GENERATE."""
    msg = decode(encode(Generate(request_id="r", model="m", params=SamplingParams(), guided=spec)))
    assert isinstance(msg, Generate)
    return msg.guided


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex", "only one"),
        ({"guided_choice": ["a"], RF: {"type": "json_object"}}, RF, "only one"),
        ({"guided_regex": "a", SO: {"regex": "b"}}, SO, "only one"),
        ({SO: {"regex": "a", "json": SCHEMA}}, SO, "only one"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_choice": ["a", 1]}, "guided_choice", "list of strings"),
        ({"guided_choice": "a"}, "guided_choice", "non-empty list"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json", "JSON object"),
        ({"guided_json": 3}, "guided_json", "JSON object"),
        ({"guided_regex": 5}, "guided_regex", "string"),
        ({"guided_grammar": "  "}, "guided_grammar", "non-empty"),
        ({RF: {"type": "yaml"}}, RF, "unsupported"),
        ({RF: "json"}, RF, "object"),
        ({RF: {"type": "json_schema"}}, RF, "json_schema"),
        ({RF: {"type": "json_schema", "json_schema": {"schema": [1]}}}, RF, "JSON object"),
        ({SO: {"structural_tag": "x"}}, SO, "not supported"),
        ({SO: ["json"]}, SO, "object"),
        ({RF: JS, "guided_whitespace_pattern": 1}, "guided_whitespace_pattern", "string"),
    ],
)
def test_spec_from_request_errors(body, param, match):
    with pytest.raises(GuidedError, match=match) as e:
        spec_from_request(body)
    assert e.value.param == param and isinstance(e.value, ValueError)


def test_spec_wire_format_and_kind_check():
    frames = encode(
        Generate(request_id="r", model="m", params=SamplingParams(), guided=G("json", ST, RF, " ?"))
    )
    wire = msgpack.unpackb(frames[1])["guided"]  # round trips are checked with the spellings
    assert wire == {"kind": "json", "value": ST, "param": RF, "whitespace_pattern": " ?"}
    with pytest.raises(ValueError, match="bad constraint kind"):
        G("yaml", "")  # type: ignore[arg-type]
    bad = msgpack.packb(
        {"request_id": "r", "model": "m", "params": {}, "guided": {**wire, "kind": "yaml"}}
    )
    with pytest.raises(ProtocolError):
        decode([frames[0], bad])


def test_module_import_is_light():
    # The gateway parses constraints with it: nothing heavy may come with it.
    code = "import sys, mlxtg.constraints as m\n"
    code += "assert m.spec_from_request({'guided_regex': 'a'}).kind == 'regex'\n"
    code += "assert not {'numpy', 'mlx', 'llguidance', 'transformers'} & set(sys.modules)\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_hits_on_repeat(hf_tok):
    c = GuidedCompiler(hf_tok, vocab_size=len(hf_tok))
    spec = G("json", json.dumps(SCHEMAS["nested"]))
    c.new_state(spec)
    c.new_state(G("json", spec.value, RF))  # param is not part of the cache key
    assert (c.stats["compiles"], c.stats["cache_hits"]) == (1, 1)
    for _ in range(2):  # errors are cached too
        with pytest.raises(GuidedError):
            c.validate(G("regex", "a(", "guided_regex"))
    assert (c.stats["compiles"], c.stats["compile_errors"], c.stats["cache_hits"]) == (2, 1, 2)
    c.clear_cache()
    c.validate(spec)
    assert c.stats["compiles"] == 3 and c.stats["compile_ms_total"] > 0
    assert c.stats["cache_hits"] == 2  # monotonic across clear_cache


def test_eos_allowed_exactly_when_complete(compiler, hf_tok):
    eos = hf_tok.eos_token_id
    state = compiler.new_state(G("regex", "ab?", "guided_regex"))
    assert not state.mask()[eos] and not state.eos_allowed()
    state.consume(hf_tok.convert_tokens_to_ids("a"))
    assert state.mask()[eos] and state.eos_allowed() and not state.is_finished()
    bad = compiler.new_state(G("regex", r"\d+", "guided_regex"))
    texts = [hf_tok.decode([i]) for i in np.flatnonzero(bad.mask())]
    assert all(re.fullmatch("[0-9]+", t) for t in texts)  # \d is ASCII, not Unicode digits
    with pytest.raises(GuidedError, match="violates") as e:
        bad.consume(hf_tok.convert_tokens_to_ids("c"))  # masked out, so rejected
    assert e.value.param == "guided_regex"
    state.consume(eos)
    assert state.is_finished()
    closed = compiler.new_state(G("json", '{"type": "array", "maxItems": 0}'))
    for t in hf_tok.encode("[]"):
        closed.consume(t)
    assert closed.is_finished()  # nothing can follow: stop without waiting for EOS
    assert closed.mask().nonzero()[0].tolist() == [eos]


def test_mixed_batch_masks_equal_single_masks(compiler, hf_tok):
    specs = [G("json", json.dumps(SCHEMAS["pydantic_refs"])), G("regex", r"\d+")]
    specs += [G("grammar", ARITH), G("choice", '["alpha", "beta"]'), G("json_object", "")]
    states = [compiler.new_state(s) for s in specs]
    for s, text in zip(states, ['{"name":"x', "12", "(3", "al", '{"k":'], strict=True):
        for t in hf_tok.encode(text):
            s.consume(t)
    batch = compiler.fill_masks(states)
    assert all(np.array_equal(batch[i], s.mask()) for i, s in enumerate(states))
    packed = compiler.fill_bitmask(states)
    assert np.array_equal(guided.unpack_bitmask(packed, compiler.vocab_size), batch)
    full = compiler.batch_masks([None, states[1], None, states[3]])
    assert full[[0, 2]].all() and np.array_equal(full[[1, 3]], batch[[1, 3]])


def test_pad_rows_narrow_logits_and_tokenizer_wrapper(hf_tok):
    n, anything = len(hf_tok), G("regex", "(?s:.*)")
    wide = GuidedCompiler(hf_tok, vocab_size=n + 100)
    masks = wide.fill_masks([wide.new_state(anything)])
    assert masks[0, :n].sum() > n // 2 and not masks[0, n:].any()
    narrow = GuidedCompiler(hf_tok, vocab_size=n - 10)  # logits narrower than the tokenizer
    assert narrow.fill_masks([narrow.new_state(anything)]).shape == (1, n - 10)
    wrapper = SimpleNamespace(_tokenizer=hf_tok, eos_token_ids={hf_tok.eos_token_id, 0})
    c = GuidedCompiler(wrapper, vocab_size=n)  # the shape of mlx_lm's TokenizerWrapper
    assert c.eos_token_ids == [0, hf_tok.eos_token_id]
    assert c.new_state(G("regex", "a?")).mask()[[0, hf_tok.eos_token_id]].all()


def test_apply_masks_bool_and_packed(compiler):
    states = [compiler.new_state(G("regex", r"[0-9]{2}")) for _ in range(2)]
    logits = mx.random.normal((4, compiler.vocab_size), key=mx.random.key(0)).astype(mx.bfloat16)
    bools, packed = compiler.fill_masks(states), compiler.fill_bitmask(states)
    out = apply_masks(logits, [1, 3], bools)
    assert out.dtype == mx.bfloat16
    assert mx.array_equal(out, apply_masks(logits, [1, 3], packed)).item()
    assert mx.array_equal(out[[0, 2]], logits[[0, 2]]).item()  # unguided rows untouched
    assert np.array_equal(np.isfinite(np.array(out[1].astype(mx.float32))), bools[0])
    out3 = apply_masks(logits[:, None, :], [1, 3], packed)
    assert mx.array_equal(out3[:, 0, :], out).item()
    assert apply_masks(logits, [], bools) is logits
    narrow = apply_masks(logits, [0], bools[:1, :100])  # missing mask columns are disallowed
    assert np.isinf(np.array(narrow[0, 100:].astype(mx.float32))).all()


def test_schemas_get_closed_objects_and_int64_integers_unless_they_say_otherwise():
    pydantic_like = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/Kid"}},
            "tags": {"type": "object"},  # no declared keys: any object
            "bounded": {"type": "integer", "minimum": 0},
        },
        "$defs": {"Kid": {"type": "object", "properties": {"age": {"type": ["integer", "null"]}}}},
    }
    got = with_defaults(pydantic_like)
    assert got["additionalProperties"] is False
    assert got["$defs"]["Kid"]["additionalProperties"] is False
    assert "additionalProperties" not in got["properties"]["tags"]
    assert (got["properties"]["n"]["minimum"], got["properties"]["n"]["maximum"]) == (
        INT64_MIN,
        INT64_MAX,
    )
    assert got["properties"]["bounded"]["minimum"] == 0
    assert got["$defs"]["Kid"]["properties"]["age"]["maximum"] == INT64_MAX
    open_obj = {"type": "object", "properties": {"a": {}}, "additionalProperties": True}
    assert with_defaults(open_obj)["additionalProperties"] is True
    assert "additionalProperties" not in with_defaults(pydantic_like, close_objects=False)
    spec = spec_from_request({"guided_json": pydantic_like})
    assert '"additionalProperties":false' in spec.value
    spec = spec_from_request(
        {"guided_json": pydantic_like, "guided_allow_additional_properties": True}
    )
    assert '"additionalProperties":false' not in spec.value
