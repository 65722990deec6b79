"""POST /v1/responses (OpenAI Responses API), stored responses and their chains.

A Responses request becomes the same GENERATE as a chat completion: input items become
chat-template messages, function tools and `tool_choice` go to the tool machinery (named and
`required` enforced by its grammar), `text.format` to the constraint engine. With `store`
(the default, as OpenAI's), the response and its conversation are kept (response_store.py),
so `previous_response_id` continues it and reuses the prompt cache of the turn before.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import paths
from ..constraints import GuidedError, spec_from_request
from ..protocol import Generate, GuidedSpec, ReasoningEffort, ReasoningRequest, SamplingParams
from . import format as fmt
from .deps import Client, Metrics
from .errors import APIError, BadRequest, NotFound
from .guards import check_request_size
from .response_store import ResponseStore
from .run import Run
from .schemas import NullMeansDefault
from .streaming import collect, open_stream, with_keepalive

log = logging.getLogger("mlxtg.gateway")

router = APIRouter(prefix="/v1")


class ReasoningParam(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: ReasoningEffort | None = None
    summary: str | None = None  # no summariser here: the reasoning item carries the text


class ResponsesRequest(NullMeansDefault):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    store: bool | None = True
    stream: bool = False
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    reasoning: ReasoningParam | None = None
    max_reasoning_tokens: int | None = Field(default=None, ge=0)  # our extension

    def reasoning_request(self) -> ReasoningRequest | None:
        effort = self.reasoning.effort if self.reasoning else None
        if effort is None and self.max_reasoning_tokens is None:
            return None
        return ReasoningRequest(effort=effort, max_tokens=self.max_reasoning_tokens)


def _store(request: Request) -> ResponseStore:
    state = request.app.state
    if getattr(state, "responses", None) is None:
        state.responses = ResponseStore(paths.home() / "responses.sqlite3")
    store: ResponseStore = state.responses
    return store


# --- request -> GENERATE ------------------------------------------------------------------


# Tools the model cannot call here: OpenAI runs them server side, and a local model has no
# search index, sandbox or browser. Requests that offer them are served without them.
HOSTED_TOOLS = (
    "web_search",
    "web_search_preview",
    "file_search",
    "code_interpreter",
    "image_generation",
    "computer_use",
    "computer_use_preview",
    "mcp",
    "tool_search",
)
# Input items that record what such tools did: nothing for the model to read back.
SKIPPED_ITEMS = ("web_search_call", "file_search_call", "tool_search_call")
IMAGE_OMITTED = "[image omitted: this model reads text only]"


def _content_text(content: Any, where: str, images_ok: bool = False) -> str:
    """Text parts joined. With `images_ok` (a tool's output: Codex's view_image must not
    end the turn), image and file parts become a note instead of a 400."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content or []:
        if images_ok and part.get("type") in ("input_image", "input_file"):
            texts.append(IMAGE_OMITTED)
            continue
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise BadRequest(
                f"{where}: content type {part.get('type')!r} is not supported (text only)",
                param=where,
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat-template messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    thought: list[str] = []  # a reasoning item's text, for the next assistant message

    def reasoned(msg: dict[str, Any]) -> dict[str, Any]:
        if thought:
            msg["reasoning_content"] = "".join(thought)
            thought.clear()
        return msg

    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input.{i}"
        if kind == "message":
            role = item.get("role", "user")
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant"):
                raise BadRequest(f"{where}.role: unsupported role {role!r}", param=where)
            msg = {"role": role, "content": _content_text(item.get("content"), where)}
            out.append(reasoned(msg) if role == "assistant" else msg)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            thought += [str(p.get("text", "")) for p in parts if isinstance(p, dict)]
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append(reasoned({"role": "assistant", "content": "", "tool_calls": [call]}))
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _content_text(output, where, True)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        elif kind in SKIPPED_ITEMS:
            continue
        else:
            raise BadRequest(f"{where}: unsupported input item type {kind!r}", param=where)
    return out


def _function_tools(tools: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Declared tools as chat-template function tools. A `namespace` (Codex groups its
    multi-agent tools in one) contributes its functions; hosted tools are left out."""
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        kind = t.get("type")
        if kind == "function" and t.get("name"):
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
            out.append({"type": "function", "function": fn})
        elif kind == "namespace" and isinstance(t.get("tools"), list):
            out += _function_tools(t["tools"], f"{where}.{i}.tools")
        elif kind in HOSTED_TOOLS:
            log.debug("%s.%d: hosted tool %r is not available here; left out", where, i, kind)
        else:
            raise BadRequest(
                f"{where}.{i}: tools of type {kind!r} are not supported (function and namespace "
                f"tools are; hosted tools such as web_search are left out)",
                param=where,
            )
    return out


def _tools(body: ResponsesRequest) -> tuple[Any, Any]:
    if not body.tools:
        return None, None
    tools = _function_tools(body.tools, "tools")
    if not tools:  # only hosted tools: serve the request as if it had none
        return None, None
    choice = body.tool_choice or "auto"
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise BadRequest(
                'tool_choice must be "auto", "required", "none" or a named function',
                param="tool_choice",
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice not in ("auto", "required", "none"):
        raise BadRequest(
            'tool_choice must be "auto", "required", "none" or a named function',
            param="tool_choice",
        )
    return (None if choice == "none" else tools), choice


def _guided(body: ResponsesRequest) -> GuidedSpec | None:
    spec_format = (body.text or {}).get("format") or {"type": "text"}
    kind = spec_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        rf: dict[str, Any] = {"type": "json_object"}
    elif kind == "json_schema":
        rf = {
            "type": "json_schema",
            "json_schema": {
                k: spec_format[k] for k in ("name", "schema", "strict") if k in spec_format
            },
        }
    else:
        raise BadRequest(f"unsupported text.format type {kind!r}", param="text.format")
    try:
        return spec_from_request({"response_format": rf})
    except GuidedError as exc:
        raise BadRequest(
            str(exc).replace("response_format", "text.format"), param="text.format"
        ) from exc


# --- routes ----------------------------------------------------------------------------------


@router.post("/responses")
async def create(body: ResponsesRequest, request: Request, client: Client, metrics: Metrics) -> Any:
    await check_request_size(
        request, body.model, 1, "input", body.max_output_tokens, "max_output_tokens"
    )
    rid = f"resp_{uuid.uuid4().hex[:24]}"
    history: list[dict[str, Any]] = []
    session = body.prompt_cache_key or body.user or rid
    if body.previous_response_id:
        found = _store(request).conversation(body.previous_response_id)
        if found is None:
            raise NotFound(
                f"no stored response {body.previous_response_id!r}", param="previous_response_id"
            )
        history, stored_session = found
        session = body.prompt_cache_key or body.user or stored_session
    turn = input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools, choice = _tools(body)
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_tokens=body.max_output_tokens,
    )
    gen = Generate(
        request_id=rid,
        model=body.model,
        params=params,
        messages=system + history + turn,
        tools=tools,
        tool_choice=choice if tools else None,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        stream=body.stream,
        guided=_guided(body),
        cache_key=session,
        reasoning=body.reasoning_request(),
    )
    run = Run(client, [gen], 1)
    shell = _shell(rid, body, run)
    items = (
        [{"type": "message", "role": "user", "content": body.input}]
        if isinstance(body.input, str)
        else list(body.input)
    )

    def finish(acc: fmt.ChoiceAccumulator) -> dict[str, Any]:
        out = dict(shell, **_outcome(rid, acc, run))
        if body.store is not False:
            reply: dict[str, Any] = {"role": "assistant", "content": "".join(acc.text)}
            if acc.reasoning:  # a chain renders what a client resending its items would
                reply["reasoning_content"] = "".join(acc.reasoning)
            if acc.tool_calls:
                reply["tool_calls"] = [acc.tool_calls[i] for i in sorted(acc.tool_calls)]
            _store(request).put(out, items, history + turn + [reply], session)
        return out

    if body.stream:
        return await _stream(run, shell, rid, finish, metrics)
    return await collect(
        request,
        run,
        lambda accs: finish(accs[0]),
        metrics,
        tokens=lambda b: int(b["usage"]["output_tokens"]),
    )


@router.get("/responses/{rid}")
async def retrieve(rid: str, request: Request) -> dict[str, Any]:
    found = _store(request).body(rid)
    if found is None:
        raise NotFound(f"no stored response {rid!r}", code="not_found")
    return found


@router.delete("/responses/{rid}")
async def delete(rid: str, request: Request) -> dict[str, Any]:
    if not _store(request).delete(rid):
        raise NotFound(f"no stored response {rid!r}", code="not_found")
    return {"id": rid, "object": "response.deleted", "deleted": True}


@router.get("/responses/{rid}/input_items")
async def input_items(rid: str, request: Request) -> dict[str, Any]:
    items = _store(request).input_items(rid)
    if items is None:
        raise NotFound(f"no stored response {rid!r}", code="not_found")
    data = [dict(item, id=item.get("id") or f"msg_{rid[5:]}_{i}") for i, item in enumerate(items)]
    for d in data:
        d.setdefault("type", "message")
        if d["type"] == "message" and isinstance(d.get("content"), str):
            d["content"] = [{"type": "input_text", "text": d["content"]}]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


# --- bodies ----------------------------------------------------------------------------------


def _shell(rid: str, body: ResponsesRequest, run: Run) -> dict[str, Any]:
    """The fields of a response that do not depend on what was generated."""
    return {
        "id": rid,
        "object": "response",
        "created_at": run.created,
        "model": body.model,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "metadata": body.metadata or {},
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "text": body.text or {"format": {"type": "text"}},
        "store": body.store is not False,
        "usage": None,
    }


def _message_item(rid: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{rid[5:]}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]
        if status == "completed"
        else [],
    }


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{call['id']}",
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    }


def _reasoning_item(rid: str, text: str, status: str = "completed") -> dict[str, Any]:
    done = status == "completed"
    return {
        "type": "reasoning",
        "id": f"rs_{rid[5:]}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}] if done else [],
        "encrypted_content": None,
        "status": status,
    }


def _usage(run: Run, output_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": run.prompt_tokens,
        "input_tokens_details": {"cached_tokens": run.cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": run.prompt_tokens + output_tokens,
    }


def _outcome(rid: str, acc: fmt.ChoiceAccumulator, run: Run) -> dict[str, Any]:
    text = "".join(acc.text)
    thought = "".join(acc.reasoning)
    output = [_reasoning_item(rid, thought)] if thought else []
    output += [_message_item(rid, text)] if text or not acc.tool_calls else []
    output += [_call_item(acc.tool_calls[i]) for i in sorted(acc.tool_calls)]
    length = acc.finish_reason == "length"
    return {
        "status": "incomplete" if length else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if length else None,
        "output": output,
        "usage": _usage(run, acc.completion_tokens, acc.reasoning_tokens),
    }


# --- streaming -------------------------------------------------------------------------------


class _Events:
    """Numbered SSE events of one streamed response."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


class _ReasoningItem:
    """The streamed reasoning item: opened by the first reasoning text, closed before the
    first answer text or tool call (or at the end)."""

    def __init__(self, rid: str, ev: _Events):
        self.rid, self.ev = rid, ev
        self.id = f"rs_{rid[5:]}"
        self.index = -1  # output index, once open
        self.text: list[str] = []
        self.state = "new"  # new | open | closed

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.id, "output_index": self.index, "content_index": 0}

    def feed(self, text: str, index: int) -> list[bytes]:
        if self.state == "closed":
            return []
        out = []
        if self.state == "new":
            self.state, self.index = "open", index
            item = _reasoning_item(self.rid, "", "in_progress")
            out.append(self.ev("response.output_item.added", output_index=index, item=item))
            part = {"type": "reasoning_text", "text": ""}
            out.append(self.ev("response.content_part.added", **self._at(), part=part))
        self.text.append(text)
        out.append(self.ev("response.reasoning_text.delta", **self._at(), delta=text))
        return out

    def close(self) -> list[bytes]:
        if self.state != "open":
            return []
        self.state = "closed"
        text = "".join(self.text)
        part = {"type": "reasoning_text", "text": text}
        return [
            self.ev("response.reasoning_text.done", **self._at(), text=text),
            self.ev("response.content_part.done", **self._at(), part=part),
            self.ev(
                "response.output_item.done",
                output_index=self.index,
                item=_reasoning_item(self.rid, text),
            ),
        ]


async def _stream(
    run: Run, shell: dict[str, Any], rid: str, finish: Any, metrics: Any
) -> StreamingResponse:
    _, headers = await open_stream(run)

    async def body() -> AsyncIterator[bytes]:
        ev, acc, status = _Events(), fmt.ChoiceAccumulator(0), "aborted"  # until done is sent
        text_index: int | None = None  # output index of the message item, once open
        thought = _ReasoningItem(rid, ev)
        calls: dict[int, int] = {}  # tool call index -> output index
        next_index = 0
        try:
            yield ev("response.created", response=shell)
            yield ev("response.in_progress", response=shell)
            await run.accept()
            item_id = f"msg_{rid[5:]}"
            async for _, delta in with_keepalive(run.events()):
                if delta is None:
                    continue
                acc.add(delta)
                if delta.reasoning:
                    for event in thought.feed(delta.reasoning, next_index):
                        yield event
                    next_index = max(next_index, thought.index + 1)
                if delta.text or delta.tool_calls:
                    for event in thought.close():
                        yield event
                if delta.text:
                    if text_index is None:
                        text_index, next_index = next_index, next_index + 1
                        yield ev(
                            "response.output_item.added",
                            output_index=text_index,
                            item=_message_item(rid, "", "in_progress"),
                        )
                        yield ev(
                            "response.content_part.added",
                            item_id=item_id,
                            output_index=text_index,
                            content_index=0,
                            part={"type": "output_text", "text": "", "annotations": []},
                        )
                    yield ev(
                        "response.output_text.delta",
                        item_id=item_id,
                        output_index=text_index,
                        content_index=0,
                        delta=delta.text,
                    )
                for frag in delta.tool_calls or ():
                    call = acc.tool_calls[frag.index]
                    if frag.index not in calls:
                        calls[frag.index], next_index = next_index, next_index + 1
                        opened = _call_item(
                            dict(call, function=dict(call["function"], arguments="")), "in_progress"
                        )
                        yield ev(
                            "response.output_item.added",
                            output_index=calls[frag.index],
                            item=opened,
                        )
                    piece = frag.arguments
                    if piece:
                        yield ev(
                            "response.function_call_arguments.delta",
                            item_id=f"fc_{call['id']}",
                            output_index=calls[frag.index],
                            delta=piece,
                        )
            for event in thought.close():
                yield event
            final = finish(acc)
            text = "".join(acc.text)
            if text_index is not None:
                part = {"type": "output_text", "text": text, "annotations": []}
                yield ev(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=text_index,
                    content_index=0,
                    text=text,
                )
                yield ev(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=text_index,
                    content_index=0,
                    part=part,
                )
                yield ev(
                    "response.output_item.done",
                    output_index=text_index,
                    item=_message_item(rid, text),
                )
            for i, out_index in calls.items():
                item = _call_item(acc.tool_calls[i])
                yield ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=out_index,
                    arguments=item["arguments"],
                )
                yield ev("response.output_item.done", output_index=out_index, item=item)
            done = (
                "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            )
            yield ev(done, response=final)
            status = "200"
        except APIError as exc:
            status = str(exc.status)
            yield ev("error", code=exc.code, message=exc.message, param=exc.param)
        finally:
            await run.__aexit__(None, None, None)
            metrics.observe_run(run, acc.completion_tokens)
            metrics.request_done(status)

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
