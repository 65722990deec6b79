"""POST /tokenize and /detokenize, in vLLM's shape.

Both go to the model's worker as a tokenize-only GENERATE, so the tokens are exactly what a
generation would prefill: the same chat template, tools and tokenizer. Nothing is generated
and nothing is cached.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import Field, model_validator

from ..protocol import Accepted, Generate
from ..worker.params import SamplingParams
from .deps import Client
from .errors import APIError, BadRequest
from .run import Run
from .schemas import ChatMessage, NullMeansDefault

router = APIRouter()


class TokenizeRequest(NullMeansDefault):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's switches, accepted at their defaults only: mlxtg tokenises as generation does.
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" or "messages"')
        for name in ("add_special_tokens", "add_generation_prompt"):
            if not getattr(self, name):
                raise ValueError(f"{name}: false is not supported (tokens are as generated)")
        if self.return_token_strs:
            raise ValueError("return_token_strs is not supported")
        return self


class DetokenizeRequest(NullMeansDefault):
    model: str
    tokens: list[int]


async def _ask(client: Client, gen: Generate) -> Accepted:
    run = Run(client, [gen], 1)
    async with run:
        await run.accept()
        reply = run.accepted(gen.request_id)
    if reply is None or reply.prompt_token_ids is None:
        raise APIError("the worker did not return tokens")
    return reply


def _generate(model: str, **fields: Any) -> Generate:
    return Generate(
        request_id=f"tok-{uuid.uuid4().hex[:24]}",
        model=model,
        params=SamplingParams(max_tokens=1).to_wire(),
        tokenize_only=True,
        **fields,
    )


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, client: Client) -> dict[str, Any]:
    if body.messages is not None:
        try:
            messages = [m.for_template() for m in body.messages]
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from exc
        gen = _generate(
            body.model,
            messages=messages,
            tools=body.tools,
            tool_choice="auto" if body.tools else None,
            chat_template_kwargs=body.chat_template_kwargs,
        )
    else:
        gen = _generate(body.model, prompt=body.prompt)
    reply = await _ask(client, gen)
    tokens = reply.prompt_token_ids or []
    return {
        "count": len(tokens),
        "max_model_len": reply.max_model_len,
        "tokens": tokens,
        "token_strs": None,
    }


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, client: Client) -> dict[str, Any]:
    try:
        reply = await _ask(client, _generate(body.model, prompt_token_ids=body.tokens))
    except APIError as exc:
        if exc.param == "prompt":  # the worker names the field of a completion
            exc.param = "tokens"
        raise
    return {"prompt": reply.prompt_text or ""}
