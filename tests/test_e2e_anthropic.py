"""End-to-end: the real `mlxtg up` driven by the official anthropic client (/v1/messages)."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from conftest import API_KEY, Server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture()
def claude(server: Server):
    with anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def test_create_text(claude):
    msg = claude.messages.create(model=MODEL, max_tokens=12, messages=HELLO, system="Be brief.")
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.content and msg.content[0].type == "text"
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 0
    assert 0 < msg.usage.output_tokens <= 12


def test_stream_events_and_text_match(claude):
    kwargs = {"model": MODEL, "max_tokens": 16, "messages": HELLO, "temperature": 0.0}
    with claude.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert kinds[-2] == "message_delta"
    whole = claude.messages.create(**kwargs)
    assert final.content[0].text == whole.content[0].text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_tool_choice_any_is_enforced_and_a_tool_result_round_trips(claude):
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    assert msg.stop_reason == "tool_use"
    call = next(b for b in msg.content if b.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input.get("city"), str)
    reply = claude.messages.create(
        model=MODEL,
        max_tokens=12,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}],
            },
        ],
    )
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_streamed_tool_input_arrives_as_json_deltas(claude):
    kwargs = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Weather in Lima?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    with claude.messages.stream(**kwargs) as stream:
        deltas = [e for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert any(d.delta.type == "input_json_delta" for d in deltas)
    call = next(b for b in final.content if b.type == "tool_use")
    assert call.name == "get_weather" and "city" in call.input
    assert final.stop_reason == "tool_use"


def test_count_tokens_matches_the_prompt(claude):
    counted = claude.messages.count_tokens(model=MODEL, messages=HELLO, system="Be brief.")
    msg = claude.messages.create(model=MODEL, max_tokens=2, messages=HELLO, system="Be brief.")
    assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0)


def test_errors_have_anthropic_shape(server: Server, claude):
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with bad, pytest.raises(anthropic.AuthenticationError) as auth:
        bad.messages.create(model=MODEL, max_tokens=4, messages=HELLO)
    assert auth.value.body["type"] == "error"
    assert auth.value.body["error"]["type"] == "authentication_error"
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
    }
    with pytest.raises(anthropic.BadRequestError) as img:
        claude.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}]
        )
    assert img.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="nope", max_tokens=4, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"
    raw = httpx.post(
        f"{server.url}/v1/messages",
        headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"},
        json={"model": MODEL, "messages": HELLO},  # no max_tokens
    )
    assert raw.status_code == 400 and raw.json()["type"] == "error"
    assert "max_tokens" in raw.json()["error"]["message"]


def test_stop_sequences_report_which_one_matched(claude):
    free = claude.messages.create(model=MODEL, max_tokens=24, messages=HELLO, temperature=0.0)
    text = free.content[0].text
    word = next((w for w in text.split() if len(w) > 2), None)
    if word is None:
        pytest.skip("the demo model wrote no usable word to stop at")
    kwargs = {"model": MODEL, "max_tokens": 24, "messages": HELLO, "temperature": 0.0}
    msg = claude.messages.create(**kwargs, stop_sequences=["zzqx", word])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == word
    assert word not in msg.content[0].text
    with claude.messages.stream(**kwargs, stop_sequences=[word]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word
