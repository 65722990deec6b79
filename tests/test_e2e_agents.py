"""End-to-end: the openai-agents SDK's default model (the Responses API) against `mlxtg up`."""

from __future__ import annotations

import pytest
from conftest import API_KEY, Server

pytestmark = pytest.mark.slow

agents = pytest.importorskip("agents")


async def test_agent_runs_a_tool_loop(server: Server):
    from openai import AsyncOpenAI

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        calls.append(city)
        return f"Sunny in {city}"

    class AnswerAfterTheTool(agents.AgentHooks):
        # After the enforced call, the next turn must answer in text: with tool_choice "auto"
        # calls are enforced too, and the tiny demo model would just call again.
        async def on_tool_end(self, context, agent, tool, result):
            agent.model_settings = agent.model_settings.resolve(
                agents.ModelSettings(tool_choice="none")
            )

    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="mlxtg-demo", openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=48, temperature=0.0),
        hooks=AnswerAfterTheTool(),
        reset_tool_choice=False,
    )
    agents.set_tracing_disabled(True)
    result = await agents.Runner.run(agent, "What is the weather in Oslo?", max_turns=4)
    assert calls == [calls[0]]  # step 1: one enforced call, executed by the SDK
    assert isinstance(result.final_output, str)  # step 2: the model read the tool's result
    await client.close()
