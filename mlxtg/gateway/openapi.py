"""The served `/openapi.json`, corrected to what the routes really answer.

FastAPI documents every body route as answering 422 `HTTPValidationError`, which no route
here ever sends: validation errors are 400s in OpenAI's shape (Anthropic's on
`/v1/messages`). This rewrites the generated document once: errors by status in the right
shape, 200 bodies for the main endpoints, SSE where a route streams, and `/metrics` as
text. Schemathesis (`make conformance`) and client generators read it. The document and the
pages that show it (`/docs`, `/redoc`) take the API key when keys are configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, JSONResponse

_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]}
_CHOICES = {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}}
_OK: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/chat/completions"): {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"object": {"const": "chat.completion"}, "choices": _CHOICES, "usage": _USAGE},
    },
    ("post", "/v1/completions"): {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {"object": {"const": "text_completion"}, "choices": _CHOICES, "usage": _USAGE},
    },
    ("get", "/v1/models"): {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"]}},
        },
    },
    ("post", "/v1/responses"): {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {"object": {"const": "response"}, "output": {"type": "array"}},
    },
    ("post", "/v1/messages"): {
        "type": "object",
        "required": ["id", "type", "role", "content", "stop_reason", "usage"],
        "properties": {"type": {"const": "message"}, "content": {"type": "array"}},
    },
    ("post", "/v1/messages/count_tokens"): {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer"}},
    },
    ("post", "/tokenize"): {
        "type": "object",
        "required": ["count", "max_model_len", "tokens"],
        "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}},
    },
    ("post", "/detokenize"): {
        "type": "object",
        "required": ["prompt"],
        "properties": {"prompt": {"type": "string"}},
    },
}
_STREAMS = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
_STATUS_TEXT = {
    400: "Invalid request (validation, context overflow, a constraint that cannot be enforced)",
    401: "Missing or wrong API key",
    403: "Host header not allowed (the DNS-rebinding guard, while listening on loopback)",
    404: "Unknown model, stored response or endpoint",
    413: "Request body over the server's limit (--max-body-mb)",
    415: "Content-Type is not application/json",
    429: "Queue full; retry after Retry-After seconds",
    503: "Not ready, draining, or the worker failed; retry",
}


def _errors(method: str, path: str) -> dict[str, Any]:
    schema = _ANTHROPIC_ERROR if path.startswith("/v1/messages") else _OPENAI_ERROR
    body = {"content": {"application/json": {"schema": schema}}}
    generates = path.startswith(("/v1/", "/tokenize", "/detokenize"))
    wanted = [400, 401, 403, 404, 429, 503] if generates else [400, 401, 403]
    if method == "post":
        wanted += [413, 415] if path.startswith("/admin/") else [413]
    return {str(code): {"description": _STATUS_TEXT[code], **body} for code in sorted(wanted)}


def build(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path.startswith(("/v1/", "/admin/", "/tokenize", "/detokenize")):
                responses.update(_errors(method, path))
            ok = responses.setdefault("200", {"description": "OK"})
            if (schema := _OK.get((method, path))) is not None:
                ok["content"] = {"application/json": {"schema": schema}}
            if path in _STREAMS:
                ok["description"] = 'OK; with "stream": true, Server-Sent Events'
                # Each event's data is a JSON chunk (chat and completions end with "[DONE]").
                ok.setdefault("content", {})["text/event-stream"] = {"schema": {}}
            if path == "/metrics":
                ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if path == "/ready":
                responses["503"] = {"description": "A model is loading, or the server drains"}
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


def install(app: FastAPI, dependencies: Sequence[Depends]) -> None:
    """Serve the corrected document (built once, on first request) and its pages, behind
    `dependencies` (the API key). The app is created with FastAPI's own routes off."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")
