"""What the real agent CLIs send, turned into chat-template messages and tools (pure
functions; the shapes were captured from Claude Code 2.1 and Codex 0.171 against mlxtg)."""

from __future__ import annotations

import pytest

from mlxtg.gateway.anthropic_routes import MessagesRequest, template_messages
from mlxtg.gateway.errors import BadRequest
from mlxtg.gateway.responses_routes import ResponsesRequest, _tools, input_messages


def _anthropic(messages: list[dict], system: str | None = "You are Claude Code.") -> list[dict]:
    body = {"model": "m", "max_tokens": 8, "messages": messages}
    if system:
        body["system"] = system
    return template_messages(MessagesRequest.model_validate(body))


def test_a_system_message_mid_conversation_joins_the_user_turn_before_it():
    out = _anthropic(
        [
            {"role": "user", "content": [{"type": "text", "text": "fix the bug"}]},
            {"role": "system", "content": "Available agent types: general"},
            {"role": "assistant", "content": "On it."},
        ]
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant"]
    assert out[1]["content"] == (
        "fix the bug\n\n<system-reminder>\nAvailable agent types: general\n</system-reminder>"
    )


def test_a_system_message_with_no_user_turn_before_it_starts_the_next_one():
    out = _anthropic(
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "hi"},
        ],
        system=None,
    )
    assert out == [{"role": "user", "content": "<system-reminder>\nBe brief.\n</system-reminder>\n\nhi"}]
    # After an assistant turn with nothing following, it becomes a user turn of its own.
    out = _anthropic(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "system", "content": "x"}],
        system=None,
    )
    assert out[-1] == {"role": "user", "content": "<system-reminder>\nx\n</system-reminder>"}


def test_an_image_in_a_tool_result_becomes_a_note_but_not_in_a_user_turn():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    out = _anthropic(
        [
            {"role": "user", "content": "look"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}]},
        ]
    )
    assert out[-1] == {"role": "tool", "tool_call_id": "t1", "content": "[image omitted: this model reads text only]"}
    with pytest.raises(BadRequest, match="image blocks are not supported"):
        _anthropic([{"role": "user", "content": [image]}])


def _responses(**body) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **body})


FN = {"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}


def test_namespace_tools_are_flattened_and_hosted_tools_left_out():
    body = _responses(
        tools=[
            FN,
            {"type": "namespace", "name": "multi_agent_v1", "description": "d", "tools": [FN | {"name": "spawn_agent"}]},
            {"type": "web_search", "external_web_access": False},
            {"type": "file_search", "vector_store_ids": []},
        ],
        tool_choice="auto",
    )
    tools, choice = _tools(body)
    assert [t["function"]["name"] for t in tools] == ["shell", "spawn_agent"]
    assert choice == "auto"
    # Only hosted tools: served as a request without tools.
    assert _tools(_responses(tools=[{"type": "web_search"}])) == (None, None)


def test_unknown_tool_types_are_a_400_naming_the_tool():
    with pytest.raises(BadRequest, match="'custom' are not supported"):
        _tools(_responses(tools=[{"type": "custom", "name": "apply_patch"}]))


def test_codex_input_items_skip_hosted_calls_and_images_in_tool_output():
    out = input_messages(
        [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "web_search_call", "id": "ws1", "status": "completed"},
            {"type": "function_call", "call_id": "c1", "name": "view_image", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_image", "image_url": "data:image/png;base64,AA=="}],
            },
        ]
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool"]
    assert out[-1]["content"] == "[image omitted: this model reads text only]"
