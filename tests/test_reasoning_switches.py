"""The thinking switch, reasoning_effort and earlier reasoning in the history, as the chat
templates of tests/reasoning_models.py render them (preprocess only, no generation)."""

from __future__ import annotations

import logging

import pytest
from reasoning_models import build_reasoning_model

from mlxtg.models import ModelSpec
from mlxtg.protocol import Generate, ReasoningEffort, ReasoningRequest, SamplingParams
from mlxtg.worker.loader import load
from mlxtg.worker.preprocess import Preprocessor, template_variables
from mlxtg.worker.reasoning import Phase

ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    out = {}
    for style in ("qwen3", "r1", "harmony"):
        path = build_reasoning_model(tmp_path_factory.mktemp(style) / "m", style)
        for parser in ("auto", "none"):
            out[style, parser] = Preprocessor(
                load(ModelSpec(model_id_or_path=str(path), reasoning_parser=parser))
            )
    return out


def render(p: Preprocessor, messages=ASK, **kw) -> tuple[str, Phase | None]:
    msg = Generate(request_id="r", model="m", params=SamplingParams(), messages=messages, **kw)
    req = p(msg)
    plan = req.payload.reasoning
    return str(p.tokenizer.decode(req.prompt)), plan.phase if plan else None


def test_template_variables():
    assert {"enable_thinking", "messages"} <= template_variables(
        "{{ enable_thinking }}{% for m in messages %}{% endfor %}"
    )
    assert template_variables("{% if %}reasoning_effort") == {"reasoning_effort"}
    assert template_variables(None) == frozenset()


def test_the_thinking_switch(pre):
    p = pre["qwen3", "auto"]
    assert p.thinking_switch and not p.takes_effort
    default = render(p)
    assert default[1] is Phase.MAYBE
    off = render(p, reasoning=ReasoningRequest(enabled=False))
    assert off[0].endswith("<think>\n\n</think>\n\n") and off[1] is Phase.ANSWER
    assert render(p, reasoning=ReasoningRequest(effort=ReasoningEffort.NONE)) == off
    assert render(p, reasoning=ReasoningRequest(enabled=True)) == default
    explicit = render(
        p,
        reasoning=ReasoningRequest(effort=ReasoningEffort.NONE),
        chat_template_kwargs={"enable_thinking": True},
    )
    assert explicit == default  # explicit chat_template_kwargs win


def test_effort_reaches_a_template_that_takes_it(pre, caplog):
    p = pre["harmony", "auto"]
    assert p.takes_effort and not p.thinking_switch
    text, _ = render(p, reasoning=ReasoningRequest(effort=ReasoningEffort.HIGH))
    assert "Reasoning: high" in text
    with caplog.at_level(logging.INFO, logger="mlxtg.worker.preprocess"):
        text, _ = render(p, reasoning=ReasoningRequest(effort=ReasoningEffort.NONE))
    assert "Reasoning: low" in text and "cannot turn thinking off" in caplog.text


def test_an_effort_the_template_ignores_is_logged_once(pre, caplog):
    p = pre["r1", "auto"]
    with caplog.at_level(logging.INFO, logger="mlxtg.worker.preprocess"):
        for _ in range(2):
            text = render(p, reasoning=ReasoningRequest(effort=ReasoningEffort.LOW))
    assert text == render(p)
    assert caplog.text.count("reasoning_effort=low") == 1


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning", "thinking"])
def test_earlier_reasoning_reaches_the_template_under_any_name(pre, name):
    history = [*ASK, {"role": "assistant", "content": "A", name: "because"}]
    assert "<think>\nbecause\n</think>" in render(pre["qwen3", "auto"], history)[0]
