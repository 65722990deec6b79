"""End-to-end: a reasoning model (tests/reasoning_models.py's R1 style: the generation prompt
opens <think>) behind `mlxtg up`, through the official openai client, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import API_KEY, Server, start_server
from reasoning_models import build_reasoning_model

pytestmark = pytest.mark.slow

MODEL = "r1-tiny"
QWEN3 = "qwen3-tiny"
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Oslo", "Paris"]},
        "days": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def r1_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with both template styles: R1 (the prompt opens <think>) and Qwen3 (the
    model may open it; enable_thinking false closes an empty block)."""
    home = tmp_path_factory.mktemp("home")
    r1 = build_reasoning_model(tmp_path_factory.mktemp("r1") / MODEL, "r1")
    qwen3 = build_reasoning_model(tmp_path_factory.mktemp("qwen3") / QWEN3, "qwen3")
    config = Path(home) / "models.yaml"
    config.write_text(
        "max_resident_models: 2\nmodels:\n"
        f"  - model_id_or_path: {r1}\n    model_name: {MODEL}\n"
        f"  - model_id_or_path: {qwen3}\n    model_name: {QWEN3}\n"
    )
    srv = start_server(Path(home), ["--config", str(config)])
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture()
def client(r1_server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{r1_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120
    ) as c:
        yield c


def ask(client: openai.OpenAI, stream: bool = False, **extra):
    return client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0.0,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
        extra_body={"ignore_eos": True, **extra},
    )


def test_reasoning_and_content_apart_stream_and_not(client: openai.OpenAI):
    reply = ask(client, max_reasoning_tokens=3)
    msg = reply.choices[0].message
    extra = msg.model_extra or {}
    assert extra["reasoning_content"] == extra["reasoning"] and extra["reasoning"]
    assert msg.content and "</think>" not in msg.content
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 4  # 3 + the forced </think>

    kinds, reasoning, content, usage = [], "", "", None
    for chunk in ask(client, stream=True, max_reasoning_tokens=3):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            dx = d.model_extra or {}
            if d.role:
                kinds.append("role")
            if dx.get("reasoning_content"):
                assert dx["reasoning"] == dx["reasoning_content"] and not d.content
                kinds.append("reasoning")
                reasoning += dx["reasoning_content"]
            if d.content:
                kinds.append("content")
                content += d.content
    order = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert order == ["role", "reasoning", "content"]
    assert (reasoning, content) == (extra["reasoning"], msg.content)
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4


def test_budget_alias_include_reasoning_and_a_uncapped_reply(client: openai.OpenAI):
    capped = ask(client, max_reasoning_tokens=3).choices[0].message
    alias = ask(client, thinking_token_budget=3).choices[0].message
    assert alias == capped
    with pytest.raises(openai.BadRequestError):
        ask(client, thinking_token_budget=3, max_reasoning_tokens=3)
    hidden = ask(client, max_reasoning_tokens=3, include_reasoning=False)
    assert hidden.choices[0].message.content == capped.content
    assert "reasoning_content" not in (hidden.choices[0].message.model_extra or {})
    assert hidden.usage is not None and hidden.usage.completion_tokens_details is not None
    for chunk in ask(client, stream=True, max_reasoning_tokens=3, include_reasoning=False):
        for c in chunk.choices:
            assert "reasoning_content" not in (c.delta.model_extra or {})
    # No cap: the tiny model never closes the block, so all of it is reasoning.
    free = ask(client)
    assert free.choices[0].message.content == ""
    assert (free.choices[0].message.model_extra or {})["reasoning"]
    assert free.usage is not None and free.usage.completion_tokens_details is not None
    assert free.usage.completion_tokens_details.reasoning_tokens == 12


def test_structured_output_after_thinking_and_a_length_cut(client: openai.OpenAI):
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=60,
        temperature=0.0,
        response_format=fmt,  # type: ignore[arg-type]
        extra_body={"max_reasoning_tokens": 3},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert json.loads(choice.message.content or "")["city"] in ("Oslo", "Paris")
    assert (choice.message.model_extra or {})["reasoning"]
    cut = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0.0,
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == ""
    assert (cut.choices[0].message.model_extra or {})["reasoning"]


# --- Anthropic /v1/messages ------------------------------------------------------------------


@pytest.fixture()
def claude(r1_server: Server):
    import anthropic

    with anthropic.Anthropic(
        base_url=r1_server.url, api_key=API_KEY, max_retries=0, timeout=120
    ) as c:
        yield c


def test_anthropic_thinking_blocks_stream_and_not(claude):
    kw = {
        "model": MODEL,
        "max_tokens": 12,
        "temperature": 0.0,
        "messages": ASK,
        "thinking": {"type": "enabled", "budget_tokens": 3},
    }
    msg = claude.messages.create(**kw)
    kinds = [b.type for b in msg.content]
    assert kinds == ["thinking", "text"]
    thinking, text = msg.content
    assert thinking.thinking and thinking.signature.startswith("mlxtg1.") and text.text
    assert 5 <= msg.usage.output_tokens <= 12  # 3 thinking, </think>, some text

    with claude.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == thinking.thinking
    assert final.content[0].signature == thinking.signature
    assert final.content[1].text == text.text
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas.index("signature_delta") < deltas.index("text_delta")

    omitted = claude.messages.create(**{**kw, "thinking": {**kw["thinking"], "display": "omitted"}})
    assert omitted.content[0].type == "thinking" and omitted.content[0].thinking == ""
    # Without `thinking` Anthropic returns no thinking block: the reasoning is still split off.
    plain = claude.messages.create(**{k: v for k, v in kw.items() if k != "thinking"})
    assert [b.type for b in plain.content] == ["text"]


# --- Responses /v1/responses -----------------------------------------------------------------


def test_responses_reasoning_item_stream_and_not(client: openai.OpenAI):
    kw = {
        "model": MODEL,
        "input": "What is the weather in Oslo?",
        "max_output_tokens": 60,
        "temperature": 0.0,
        "reasoning": {"effort": "low"},
        # A schema makes the answer end (the tiny model never emits EOS on its own).
        "text": {"format": {"type": "json_schema", "name": "w", "schema": SCHEMA}},
        "extra_body": {"max_reasoning_tokens": 3},
    }
    resp = client.responses.create(**kw)
    kinds = [o.type for o in resp.output]
    assert kinds == ["reasoning", "message"] and resp.status == "completed"
    assert json.loads(resp.output_text)["city"] in ("Oslo", "Paris")
    item = resp.output[0]
    assert item.content and item.content[0].text and item.id.startswith("rs_")
    assert resp.usage is not None and resp.usage.output_tokens_details.reasoning_tokens == 4

    with client.responses.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == item.content[0].text
    assert final.output_text == resp.output_text
    assert events.index("response.reasoning_text.done") < events.index("response.output_text.delta")

    # The reasoning item of a stored reply and a resent one reach the next turn alike.
    nxt = client.responses.create(
        model=MODEL, input="And tomorrow?", previous_response_id=resp.id, max_output_tokens=1
    )
    resent = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            item.model_dump(exclude_none=True),
            {"role": "assistant", "content": resp.output_text},
            {"role": "user", "content": "And tomorrow?"},
        ],
        max_output_tokens=1,
    )
    assert nxt.usage is not None and resent.usage is not None
    assert nxt.usage.input_tokens == resent.usage.input_tokens


def test_effort_none_turns_a_switchable_template_off(client: openai.OpenAI):
    def reply(**extra):
        return client.chat.completions.create(
            model=QWEN3,
            messages=ASK,  # type: ignore[arg-type]
            max_tokens=6,
            temperature=0.0,
            logit_bias={"1020": 100},  # <think>: the model opens a block whenever it may
            extra_body={"ignore_eos": True, **extra},
        )

    on = reply(max_reasoning_tokens=0)
    assert (on.choices[0].message.model_extra or {}).get("reasoning") is None  # empty block
    assert on.usage is not None and on.usage.completion_tokens_details is not None
    assert on.usage.completion_tokens_details.reasoning_tokens == 2  # <think></think>
    off = reply(reasoning_effort="none")  # the template pre-fills an empty block
    assert off.choices[0].message.content == "<think>" * 6
    assert off.usage is not None and off.usage.completion_tokens_details is None


def test_status_names_the_reasoning_format(r1_server: Server, client: openai.OpenAI):
    ask(client)  # the first model is loaded and answering
    models = {m["name"]: m for m in r1_server.status()["models"]}
    facts = (models[MODEL].get("worker") or {}).get("facts", {})
    assert facts.get("reasoning", "").startswith("think(")
