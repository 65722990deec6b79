"""End-to-end: the real `mlxtg up` driven by the official openai client's Responses API."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import API_KEY, Server, start_server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}},  # completes in 64 tokens
        "required": ["city"],
    },
    "strict": True,
}


def test_create_text_and_retrieve_delete(client):
    r = client.responses.create(
        model=MODEL, input="Hello! How are you?", max_output_tokens=12, instructions="Be brief."
    )
    assert r.status in ("completed", "incomplete") and r.output_text
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert client.responses.retrieve(r.id).output_text == r.output_text
    items = client.responses.input_items.list(r.id)
    assert items.data[0].content[0].text == "Hello! How are you?"
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_stream_event_order_and_final_text(client):
    kwargs = {
        "model": MODEL,
        "input": "Tell me about Paris.",
        "max_output_tokens": 16,
        "temperature": 0.0,
    }
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.done",
    ):
        assert kind in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    whole = client.responses.create(**kwargs)
    assert whole.output_text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta"
    )
    assert events[-1].response.output_text == whole.output_text


def test_required_tool_call_and_function_call_output_round_trip(client):
    r = client.responses.create(
        model=MODEL,
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    follow = client.responses.create(
        model=MODEL,
        previous_response_id=r.id,
        tools=[WEATHER],
        max_output_tokens=8,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
    )
    assert follow.status in ("completed", "incomplete")
    assert follow.usage.input_tokens_details.cached_tokens > 0  # the chain reused the cache


def test_streamed_function_call_arguments(client):
    events = list(
        client.responses.create(
            model=MODEL,
            input="Weather in Lima?",
            tools=[WEATHER],
            stream=True,
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=64,
            temperature=0,
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments and "city" in json.loads(done.arguments)
    kwargs = {
        "model": MODEL,
        "input": "Weather in Lima?",
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_output_tokens": 64,
        "temperature": 0,
    }
    with client.responses.stream(**kwargs) as stream:  # the SDK's own accumulating helper
        final = stream.get_final_response()
    assert final.status == "completed" and final.output[-1].type == "function_call"


def test_text_format_json_schema_is_enforced(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input="A person as JSON.",
        max_output_tokens=120,
        temperature=1.0,
        text={
            "format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
        },
    )
    assert r.status == "completed"  # the constraint completed within the budget
    jsonschema.validate(json.loads(r.output_text), schema)


def test_errors_are_openai_shaped(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
    assert missing.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as bad:
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "xml"}})
    assert bad.value.body["param"] == "text.format"


def test_previous_response_id_survives_a_restart(tmp_path):
    home = tmp_path / "home"
    srv = start_server(home, [])
    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0) as c:
            first = c.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6)
    finally:
        assert srv.stop() == 0
    again: Server = start_server(home, [])
    try:
        with openai.OpenAI(base_url=f"{again.url}/v1", api_key=API_KEY, max_retries=0) as c:
            assert c.responses.retrieve(first.id).id == first.id
            second = c.responses.create(
                model=MODEL,
                previous_response_id=first.id,
                input="What is my name?",
                max_output_tokens=6,
            )
            assert second.previous_response_id == first.id
            assert second.usage.input_tokens > first.usage.input_tokens
    finally:
        assert again.stop() == 0
