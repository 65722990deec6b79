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

from ..protocol import Accepted, ControlOp, Generate, SamplingParams
from .deps import Client
from .errors import APIError, BadRequest, Unavailable
from .run import Run
from .schemas import ChatMessage, NullMeansDefault

router = APIRouter()


class TokenizeRequest(NullMeansDefault):
    model: str | None = None  # vLLM serves one model; here None means the first configured
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True  # text prompts: false leaves out BOS and the like
    # Accepted at its default only: chat prompts are tokenised as generation renders them.
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError('give exactly one of "prompt" or "messages"')
        if not self.add_generation_prompt:
            raise ValueError("add_generation_prompt: false is not supported")
        if not self.add_special_tokens and self.messages is not None:
            raise ValueError("add_special_tokens: false applies to a text prompt only")
        if self.return_token_strs:
            raise ValueError("return_token_strs is not supported")
        return self


class DetokenizeRequest(NullMeansDefault):
    model: str | None = None
    tokens: list[int]


async def _model(client: Client, name: str | None) -> str:
    """The model a tokenizer route is for: the one named, else the first configured."""
    if name:
        return name
    models = (await client.control(ControlOp.STATUS)).data["models"]
    if not models:
        raise Unavailable("no model is configured")
    return str(models[0]["name"])


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
        params=SamplingParams(max_tokens=1),
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
            await _model(client, body.model),
            messages=messages,
            tools=body.tools,
            tool_choice="auto" if body.tools else None,
            chat_template_kwargs=body.chat_template_kwargs,
        )
    else:
        gen = _generate(
            await _model(client, body.model),
            prompt=body.prompt,
            add_special_tokens=body.add_special_tokens,
        )
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
        gen = _generate(await _model(client, body.model), prompt_token_ids=body.tokens)
        reply = await _ask(client, gen)
    except APIError as exc:
        if exc.param == "prompt":  # the worker names the field of a completion
            exc.param = "tokens"
        raise
    return {"prompt": reply.prompt_text or ""}


@router.get("/tokenizer_info")
async def tokenizer_info(client: Client, model: str | None = None) -> dict[str, Any]:
    """The tokenizer's special tokens and chat template (vLLM's endpoint), for clients that
    tokenise through the server (lm-eval-harness's remote tokenizer)."""
    # A one-token prompt: the worker validates it like any other and answers at once.
    reply = await _ask(
        client, _generate(await _model(client, model), prompt=" ", tokenizer_info=True)
    )
    return reply.tokenizer_info or {}
