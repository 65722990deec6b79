"""End-to-end with the official SDKs, sending what Claude Code and Codex send that plain SDK
examples don't: a system message mid-conversation (Claude Code's mid-conversation-system
beta), Codex's namespace and hosted tools, an image in a tool's output."""

from __future__ import annotations

import anthropic
import openai
import pytest
from conftest import API_KEY, Server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"


def test_claude_code_shaped_request_streams(server: Server):
    claude = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
        {"role": "system", "content": "Available agent types: general-purpose"},
    ]
    with claude.messages.stream(
        model=MODEL,
        max_tokens=16,
        system=[{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        messages=messages,  # type: ignore[arg-type]
        extra_headers={"anthropic-beta": "mid-conversation-system-2026-04-07,claude-code-20250219"},
        extra_body={"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens")
    count = claude.messages.count_tokens(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert count.input_tokens > 0


def test_codex_shaped_request_streams(server: Server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    fn = {"type": "function", "name": "shell", "description": "run", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}
    tools = [
        fn,
        {"type": "namespace", "name": "multi_agent_v1", "description": "agents", "tools": [fn | {"name": "spawn_agent"}]},
        {"type": "web_search", "external_web_access": False},
    ]
    events = list(
        client.responses.create(
            model=MODEL,
            input=[
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]},
                {"type": "function_call", "call_id": "c1", "name": "view_image", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": "data:image/png;base64,AA=="}]},
            ],
            tools=tools,  # type: ignore[arg-type]
            tool_choice="auto",
            stream=True,
            store=False,
            max_output_tokens=16,
            extra_body={"include": ["reasoning.encrypted_content"], "reasoning": {"summary": "auto"}, "prompt_cache_key": "codex-1"},
        )
    )
    assert events[-1].type in ("response.completed", "response.incomplete")
