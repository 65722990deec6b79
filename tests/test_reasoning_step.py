"""Reasoning models through `Engine.step` (no server): the split of reasoning from the
answer, stop strings and tool parsing on the answer only, reasoning token counts. The models
are tests/reasoning_models.py's (random weights, real reasoning templates)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from reasoning_models import build_reasoning_model

from mlxtg.models import ModelSpec
from mlxtg.protocol import Generate, Output, ReasoningRequest
from mlxtg.worker.engine import Engine
from mlxtg.worker.loader import load
from mlxtg.worker.params import SamplingParams
from mlxtg.worker.prefix_cache import RamPrefixCache
from mlxtg.worker.preprocess import Preprocessor
from mlxtg.worker.prompt_cache import PromptCache
from mlxtg.worker.reasoning import Phase
from mlxtg.worker.scheduler import Scheduler

THINK, END_THINK, TOOL_CALL = 1020, 1021, 1022
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Oslo", "Paris"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Loaded models by (style, reasoning_parser)."""
    out = {}
    for style in ("r1", "qwen3"):
        path = build_reasoning_model(tmp_path_factory.mktemp(style) / "m", style)
        for parser in ("auto", "none"):
            spec = ModelSpec(model_id_or_path=str(path), reasoning_parser=parser)
            out[style, parser] = load(spec)
    return out


@dataclass
class Choice:
    text: str = ""
    reasoning: str = ""
    tokens: list[int] = field(default_factory=list)
    tool_calls: list = field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0
    reasoning_tokens: int = 0


def run(loaded, compiler=None, content="think about the weather", patch=None, **kw) -> Choice:
    """One chat request, greedy, run to its end; its choice 0 joined. `patch(request)`
    may change the preprocessed request."""
    reasoning = kw.pop("reasoning", None)
    keys = ("tools", "tool_choice", "chat_template_kwargs", "guided")
    msg_kw = {k: kw.pop(k) for k in keys if k in kw}
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **kw})
    msg = Generate(
        request_id="r",
        model="m",
        params=params,
        messages=[{"role": "user", "content": content}],
        reasoning=reasoning,
        **msg_kw,
    )
    eng = Engine(
        loaded,
        PromptCache(RamPrefixCache(0, min_tokens=4)),
        guided=compiler,
        scheduler=Scheduler(max_batch=4, max_queued=4, chunk_tokens=512),
    )
    choice = Choice()
    inputs = [Preprocessor(loaded, compiler)(msg)]
    if patch is not None:
        patch(inputs[0])
    for _ in range(200):
        for m in eng.step(inputs):
            assert isinstance(m, Output) or m.TYPE.value == "ACCEPTED", m
            for d in m.deltas if isinstance(m, Output) else []:
                choice.text += d.text
                choice.reasoning += d.reasoning
                choice.tokens += d.token_ids
                choice.tool_calls += d.tool_calls or []
                if d.finish_reason:
                    choice.finish = d.finish_reason
                    choice.completion_tokens = d.completion_tokens
                    choice.reasoning_tokens = d.reasoning_tokens
                else:
                    assert d.reasoning_tokens == 0  # only on the final delta
        inputs = []
        if eng.idle:
            return choice
    raise AssertionError("the engine did not go idle")


def test_formats_are_detected_at_load(models):
    assert str(models["r1", "auto"].reasoning) == "think(<think>,</think>)"
    assert models["r1", "auto"].reasoning.end_ids == (END_THINK,)
    assert models["qwen3", "none"].reasoning is None


def test_inside_the_templates_block_everything_is_reasoning(models):
    plain = run(models["r1", "none"])
    split = run(models["r1", "auto"])
    assert split.tokens == plain.tokens and END_THINK not in split.tokens
    assert split.text == "" and split.reasoning == plain.text.strip()
    assert split.finish == "length" and split.completion_tokens == 8
    assert split.reasoning_tokens == 8


def test_stop_strings_apply_to_the_answer_only(models):
    plain = run(models["r1", "none"], max_tokens=12)
    stop = plain.text.strip()[2:5]
    assert run(models["r1", "none"], max_tokens=12, stop=[stop]).finish == "stop"
    split = run(models["r1", "auto"], max_tokens=12, stop=[stop])
    assert split.finish == "length" and split.tokens == plain.tokens
    assert stop in split.reasoning


def test_a_block_the_model_does_not_open_leaves_the_answer_unchanged(models):
    plain = run(models["qwen3", "none"])
    split = run(models["qwen3", "auto"])
    assert split.tokens == plain.tokens and THINK not in plain.tokens
    assert (split.text, split.reasoning, split.reasoning_tokens) == (plain.text, "", 0)


def test_a_block_the_model_opens_is_reasoning(models):
    # A bias makes the model open (and keep opening) blocks: all of it is reasoning text.
    split = run(models["qwen3", "auto"], logit_bias={THINK: 100.0}, max_tokens=4)
    assert split.tokens == [THINK] * 4
    assert split.text == "" and split.reasoning == "<think>" * 3
    assert split.reasoning_tokens == 4


def test_enable_thinking_false_starts_in_the_answer(models):
    loaded = models["qwen3", "auto"]
    pre = Preprocessor(loaded)
    msg = Generate(
        request_id="r",
        model="m",
        params=SamplingParams(max_tokens=4),
        messages=[{"role": "user", "content": "hi"}],
        chat_template_kwargs={"enable_thinking": False},
    )
    assert pre(msg).payload.reasoning.phase is Phase.ANSWER
    plain = run(models["qwen3", "none"], chat_template_kwargs={"enable_thinking": False})
    split = run(loaded, chat_template_kwargs={"enable_thinking": False})
    assert split.text == plain.text.lstrip() and split.reasoning == ""
    assert split.reasoning_tokens == 0


def test_the_tool_parser_never_sees_reasoning(models):
    fed: list[str] = []

    def record(req):
        make = req.payload.parser_factory

        def factory():
            parser = make()
            feed = parser.feed
            parser.feed = lambda text: (fed.append(text), feed(text))[1]
            return parser

        req.payload.parser_factory = factory

    split = run(models["r1", "auto"], tools=TOOLS, patch=record)
    assert split.reasoning and split.text == "" and fed == []
    plain = run(models["r1", "none"], tools=TOOLS, patch=record)
    assert "".join(fed) == plain.text


def test_completions_get_no_reasoning_split(models):
    loaded = models["r1", "auto"]
    msg = Generate(request_id="r", model="m", params=SamplingParams(), prompt="<think>\nhi")
    assert Preprocessor(loaded)(msg).payload.reasoning is None


def test_a_negative_cap_is_a_400(models):
    from mlxtg.worker.params import RequestError

    msg = Generate(
        request_id="r",
        model="m",
        params=SamplingParams(),
        messages=[{"role": "user", "content": "hi"}],
        reasoning=ReasoningRequest(max_tokens=-1),
    )
    with pytest.raises(RequestError, match="max_reasoning_tokens"):
        Preprocessor(models["r1", "auto"])(msg)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_cap_forces_the_end_marker(models, temperature):
    plain = run(models["r1", "none"], max_tokens=12)
    capped = run(
        models["r1", "auto"],
        max_tokens=12,
        temperature=temperature,
        seed=3,
        reasoning=ReasoningRequest(max_tokens=3),
    )
    end = capped.tokens.index(END_THINK)
    assert end == 3 and capped.reasoning_tokens == 4 and capped.completion_tokens == 12
    if temperature == 0.0:
        assert capped.tokens[:3] == plain.tokens[:3]
    assert capped.text and capped.reasoning  # both parts, markers removed
    assert "</think>" not in capped.text + capped.reasoning


def test_cap_zero_closes_the_block_at_once(models):
    capped = run(models["r1", "auto"], reasoning=ReasoningRequest(max_tokens=0))
    assert capped.tokens[0] == END_THINK and END_THINK not in capped.tokens[1:]
    assert capped.reasoning == "" and capped.reasoning_tokens == 1 and capped.text


def test_cap_zero_after_the_models_own_opening(models):
    capped = run(
        models["qwen3", "auto"],
        logit_bias={THINK: 100.0},
        max_tokens=4,
        reasoning=ReasoningRequest(max_tokens=0),
    )
    assert capped.tokens == [THINK, END_THINK, THINK, THINK]
    assert capped.reasoning == "" and capped.reasoning_tokens == 2
    assert capped.text == "<think><think>"


def test_a_capped_row_leaves_its_batch_neighbours_alone(models):
    loaded = models["r1", "auto"]
    alone = run(loaded, content="another question", max_tokens=10)
    eng = Engine(
        loaded,
        PromptCache(RamPrefixCache(0, min_tokens=4)),
        scheduler=Scheduler(max_batch=4, max_queued=4, chunk_tokens=512),
    )
    reqs = []
    for rid, content, cap in (("a", "think about the weather", 2), ("b", "another question", None)):
        msg = Generate(
            request_id=rid,
            model="m",
            params=SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
            messages=[{"role": "user", "content": content}],
            reasoning=ReasoningRequest(max_tokens=cap),
        )
        reqs.append(Preprocessor(loaded)(msg))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    inputs = reqs
    while True:
        for m in eng.step(inputs):
            for d in m.deltas if isinstance(m, Output) else []:
                tokens[d.request_id] += d.token_ids
        inputs = []
        if eng.idle:
            break
    assert tokens["a"][2] == END_THINK and tokens["b"] == alone.tokens


# --- constraints after the reasoning block ------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "days": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compilers(models):
    from mlxtg.worker.guided import GuidedCompiler

    return {k: GuidedCompiler(m.tokenizer, m.vocab_size) for k, m in models.items()}


def guided_json():
    import json

    from mlxtg.protocol import ConstraintKind, GuidedSpec

    return GuidedSpec(ConstraintKind.JSON, json.dumps(SCHEMA), "guided_json")


def run_guided(models, compilers, key, **kw) -> Choice:
    return run(models[key], compilers[key], **kw)


def test_guided_json_after_thinking_validates(models, compilers):
    import json

    import jsonschema

    out = run_guided(
        models,
        compilers,
        ("r1", "auto"),
        guided=guided_json(),
        max_tokens=40,
        ignore_eos=False,
        reasoning=ReasoningRequest(max_tokens=3),
    )
    assert out.tokens.index(END_THINK) == 3 and out.reasoning_tokens == 4
    assert out.reasoning and out.finish == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)


def test_a_length_cut_inside_the_reasoning_leaves_the_answer_empty(models, compilers):
    out = run_guided(
        models, compilers, ("r1", "auto"), guided=guided_json(), max_tokens=5, ignore_eos=False
    )
    assert out.finish == "length" and out.text == "" and out.reasoning
    assert out.reasoning_tokens == 5


def test_a_forced_tool_call_after_thinking(models, compilers):
    import json

    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = run(
        models["qwen3", "auto"],
        compilers["qwen3", "auto"],
        tools=TOOLS,
        tool_choice=choice,
        logit_bias={THINK: 100.0},  # the model opens a block; the grammar allows it once
        max_tokens=60,
        ignore_eos=False,
        reasoning=ReasoningRequest(max_tokens=3),
    )
    assert out.tokens[0] == THINK and out.tokens.index(END_THINK) == 4
    assert out.reasoning and out.reasoning_tokens == 5
    assert out.finish == "tool_calls" and out.text == ""
    calls = [c for c in out.tool_calls if c.name]
    assert [c.name for c in calls] == ["get_weather"]
    args = "".join(c.arguments for c in out.tool_calls)
    assert isinstance(json.loads(args), dict)


def test_no_block_no_wrap(models, compilers):
    """enable_thinking false closes the block in the prompt: today's grammar, unwrapped."""
    loaded = models["qwen3", "auto"]
    msg = Generate(
        request_id="r",
        model="m",
        params=SamplingParams(),
        messages=[{"role": "user", "content": "hi"}],
        chat_template_kwargs={"enable_thinking": False},
        guided=guided_json(),
    )
    assert Preprocessor(loaded, compilers["qwen3", "auto"])(msg).payload.guide_prefix is None
    msg = Generate(
        request_id="r",
        model="m",
        params=SamplingParams(),
        messages=[{"role": "user", "content": "hi"}],
        guided=guided_json(),
    )
    payload = Preprocessor(loaded, compilers["qwen3", "auto"])(msg).payload
    assert payload.guide_prefix is not None and "@answer" in payload.guide_prefix


def test_the_prefix_is_part_of_the_compile_cache_key(models):
    from mlxtg.worker.guided import GuidedCompiler, GuidedError
    from mlxtg.worker.reasoning import prefix_lark

    loaded = models["r1", "auto"]
    c = GuidedCompiler(loaded.tokenizer, loaded.vocab_size)
    prefix = prefix_lark(loaded.reasoning, Phase.REASONING)
    for _ in range(2):
        c.validate(guided_json())
        c.validate(guided_json(), prefix)
    assert c.stats["compiles"] == 2 and c.stats["cache_hits"] == 2
    from mlxtg.protocol import ConstraintKind, GuidedSpec

    with pytest.raises(GuidedError, match="regex"):
        c.validate(GuidedSpec(ConstraintKind.REGEX, "a(", "guided_regex"), prefix)
    state = c.new_state(guided_json(), prefix)
    mask = state.mask()
    assert mask[END_THINK] and not mask[loaded.eos_ids[0]]  # no EOS inside the reasoning


# --- prompt cache across turns -----------------------------------------------------------------


def _turns(loaded, cache: RamPrefixCache, turns: int) -> list:
    """A conversation of `turns` user turns on one engine, each answer sent back as the
    client would (content only); the ACCEPTED of every turn."""
    from mlxtg.protocol import Accepted

    eng = Engine(
        loaded,
        PromptCache(cache),
        scheduler=Scheduler(max_batch=4, max_queued=4, chunk_tokens=512),
    )
    messages: list[dict] = []
    accepted = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question number {t} about the weather"})
        msg = Generate(
            request_id=f"t{t}",
            model="m",
            params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
            messages=list(messages),
            reasoning=ReasoningRequest(max_tokens=2),
        )
        inputs, answer = [Preprocessor(loaded)(msg)], ""
        while True:
            for m in eng.step(inputs):
                if isinstance(m, Accepted):
                    accepted.append(m)
                for d in m.deltas if isinstance(m, Output) else []:
                    answer += d.text
            inputs = []
            if eng.idle:
                break
        messages.append({"role": "assistant", "content": answer})
    return accepted


@pytest.fixture(scope="module")
def r1_swa(tmp_path_factory):
    path = build_reasoning_model(tmp_path_factory.mktemp("swa") / "m", "r1", arch="llama_swa")
    return load(ModelSpec(model_id_or_path=str(path)))


def test_untrimmable_caches_keep_the_prompt_before_the_reasoning_tail(r1_swa):
    accepted = _turns(r1_swa, RamPrefixCache(1 << 30, min_tokens=4), 3)
    # Each turn's prompt ends "<|im_start|>assistant\n<think>\n": the next turn renders that
    # turn without "<think>\n", so only a checkpoint before it can be reused.
    for before, after in zip(accepted, accepted[1:], strict=False):
        assert after.cache_source == "ram"
        assert before.prompt_tokens - 3 <= after.cached_tokens < before.prompt_tokens


def test_a_miss_names_the_dropped_reasoning(models):
    from mlxtg.worker.reasoning import reasoning_at

    loaded = models["r1", "auto"]
    cache = RamPrefixCache(1 << 30, min_tokens=4, explain=reasoning_at(loaded.reasoning))
    accepted = _turns(loaded, cache, 2)
    reason = accepted[1].cache_miss_reason or ""
    assert reason.startswith("reasoning_dropped_at_token_"), reason
    plain = _turns(loaded, RamPrefixCache(1 << 30, min_tokens=4), 2)
    assert (plain[1].cache_miss_reason or "").startswith("diverged_at_token_")


# --- harmony (gpt-oss style): analysis channel, then final ----------------------------------


def test_harmony_analysis_then_a_forced_final_channel(tmp_path_factory):
    import json

    import jsonschema

    from mlxtg.worker.guided import GuidedCompiler

    path = build_reasoning_model(tmp_path_factory.mktemp("harmony") / "m", "harmony")
    loaded = load(ModelSpec(model_id_or_path=str(path)))
    fmt = loaded.reasoning
    assert fmt is not None and fmt.name == "harmony"
    channel = loaded.tokenizer.get_vocab()["<|channel|>"]
    out = run(
        loaded,
        GuidedCompiler(loaded.tokenizer, loaded.vocab_size),
        guided=guided_json(),
        max_tokens=60,
        ignore_eos=False,
        logit_bias={channel: 50.0},  # the grammar lets the header be analysis or final
        reasoning=ReasoningRequest(max_tokens=2),
    )
    assert out.finish == "stop" and out.reasoning
    jsonschema.validate(json.loads(out.text), SCHEMA)
    # The header, 2 reasoning tokens, then the whole multi-token end marker, forced.
    head = len(fmt.start_ids)
    assert out.tokens[: head + 2 + len(fmt.end_ids)][-len(fmt.end_ids) :] == list(fmt.end_ids)
    assert out.reasoning_tokens == head + 2 + len(fmt.end_ids)
