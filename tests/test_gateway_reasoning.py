"""Chat completions' reasoning fields, without a server: request parsing and the reply's shape."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlxtg.gateway import format as fmt
from mlxtg.gateway.schemas import ChatCompletionRequest
from mlxtg.protocol import Delta, FinishReason, ReasoningEffort, ReasoningRequest

ASK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_reasoning_fields_become_one_request_record():
    assert ChatCompletionRequest.model_validate(ASK).reasoning() is None
    req = ChatCompletionRequest.model_validate({**ASK, "thinking_token_budget": 5})
    assert req.reasoning() == ReasoningRequest(max_tokens=5)
    req = ChatCompletionRequest.model_validate(
        {**ASK, "max_reasoning_tokens": 0, "reasoning_effort": "low"}
    )
    assert req.reasoning() == ReasoningRequest(effort=ReasoningEffort.LOW, max_tokens=0)
    for bad in (
        {"max_reasoning_tokens": 1, "thinking_token_budget": 1},
        {"max_reasoning_tokens": -1},
        {"reasoning_effort": "extreme"},
    ):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**ASK, **bad})


def test_the_reply_carries_reasoning_only_when_there_is_some():
    acc = fmt.ChoiceAccumulator(0)
    acc.add(Delta(request_id="r", text="", reasoning="hm"))
    acc.add(
        Delta(
            request_id="r",
            text="42",
            reasoning=" ok",
            finish_reason=FinishReason.STOP,
            completion_tokens=5,
            reasoning_tokens=3,
        )
    )
    msg = acc.chat_choice()["message"]
    assert msg["reasoning_content"] == msg["reasoning"] == "hm ok" and msg["content"] == "42"
    assert "reasoning" not in acc.chat_choice(include_reasoning=False)["message"]
    assert acc.reasoning_tokens == 3
    assert fmt.usage(1, 5, 0, 3)["completion_tokens_details"] == {"reasoning_tokens": 3}
    plain = fmt.ChoiceAccumulator(0)
    plain.add(Delta(request_id="r", text="x", finish_reason=FinishReason.STOP))
    assert set(plain.chat_choice()["message"]) == {"role", "content", "refusal"}
    assert "completion_tokens_details" not in fmt.usage(1, 1, 0)


def test_anthropic_thinking_becomes_a_reasoning_request_and_history():
    from mlxtg.gateway.anthropic_routes import MessagesRequest, signature, template_messages

    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert MessagesRequest.model_validate(base).reasoning() is None
    on = MessagesRequest.model_validate(
        {**base, "thinking": {"type": "enabled", "budget_tokens": 3}}
    )
    assert on.reasoning() == ReasoningRequest(enabled=True, max_tokens=3) and on.shows_thinking
    off = MessagesRequest.model_validate({**base, "thinking": {"type": "disabled"}})
    assert off.reasoning() == ReasoningRequest(enabled=False) and not off.shows_thinking
    effort = MessagesRequest.model_validate({**base, "output_config": {"effort": "max"}})
    assert effort.reasoning() == ReasoningRequest(effort=ReasoningEffort.MAX)
    with pytest.raises(ValidationError):
        MessagesRequest.model_validate({**base, "thinking": {"type": "sometimes"}})
    history = MessagesRequest.model_validate(
        {
            **base,
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "look", "signature": "s"},
                        {"type": "redacted_thinking", "data": "xx"},
                        {"type": "text", "text": "Sunny."},
                    ],
                },
            ],
        }
    )
    assert template_messages(history)[1] == {
        "role": "assistant",
        "content": "Sunny.",
        "reasoning_content": "look",
    }
    assert signature("a") == signature("a") != signature("b")
    assert signature("a").startswith("mlxtg1.") and len(signature("a")) == 29


def test_responses_reasoning_items_join_the_next_assistant_message():
    from mlxtg.gateway.responses_routes import ResponsesRequest, input_messages

    items = [
        {"role": "user", "content": "hi"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "look it up"}],
        },
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "ok"}]},
        {"role": "assistant", "content": "Sunny."},
    ]
    msgs = input_messages(items)
    assert msgs[1]["reasoning_content"] == "look it up" and msgs[1]["tool_calls"]
    assert msgs[3] == {"role": "assistant", "content": "Sunny.", "reasoning_content": "ok"}
    body = {"model": "m", "input": "hi"}
    assert ResponsesRequest.model_validate(body).reasoning_request() is None
    req = ResponsesRequest.model_validate(
        {**body, "reasoning": {"effort": "high", "summary": "auto"}, "max_reasoning_tokens": 2}
    )
    assert req.reasoning_request() == ReasoningRequest(effort=ReasoningEffort.HIGH, max_tokens=2)
