"""One exception tree, mapped once to OpenAI error bodies; `from_kind` maps the error kinds
other processes send (protocol/errors.py) onto it, once.

APIError
├── BadRequest            400  invalid_request_error
│   └── ContextOverflow   400  context_length_exceeded
├── Unauthorized          401  authentication_error
├── Forbidden             403  permission_error (a Host the server does not answer to)
├── NotFound              404  model_not_found / not_found
├── PayloadTooLarge       413  invalid_request_error, code request_too_large
├── UnsupportedMediaType  415  invalid_request_error, code unsupported_media_type
├── RateLimited           429  rate_limit_error (+ Retry-After)
├── Unavailable           503  server_error (+ Retry-After)
└── InternalError         500  server_error (a bug: logged with its traceback)
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..protocol import Error, ErrorKind

log = logging.getLogger("mlxtg.gateway")


class APIError(Exception):
    status = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextOverflow(BadRequest):
    default_code = "context_length_exceeded"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class Forbidden(APIError):
    status = 403
    type = "permission_error"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(APIError):
    status = 429
    type = "rate_limit_error"


class Unavailable(APIError):
    status = 503
    type = "server_error"


class InternalError(APIError):
    status = 500
    type = "server_error"


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    503: Unavailable,
    500: InternalError,
}


# kind -> (exception, its default code). The one place a kind gets an HTTP status.
_BY_KIND: dict[ErrorKind, tuple[type[APIError], str | None]] = {
    ErrorKind.INVALID_REQUEST: (BadRequest, None),
    ErrorKind.CONTEXT_OVERFLOW: (ContextOverflow, None),
    ErrorKind.MODEL_NOT_FOUND: (NotFound, "model_not_found"),
    ErrorKind.QUEUE_FULL: (RateLimited, "queue_full"),
    ErrorKind.UNAVAILABLE: (Unavailable, None),
    ErrorKind.GENERATION_FAILED: (InternalError, None),
    ErrorKind.INTERNAL: (InternalError, None),
}


def from_kind(
    kind: ErrorKind,
    message: str,
    param: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> APIError:
    """The exception for an error of `kind` that a worker or the supervisor reported."""
    cls, default_code = _BY_KIND.get(kind, (InternalError, None))
    return cls(message, param=param, code=code or default_code, retry_after=retry_after)


def from_error(msg: Error) -> APIError:
    """The exception for an ERROR message."""
    return from_kind(msg.kind, msg.message, msg.param, msg.code, msg.retry_after)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError, path: str) -> JSONResponse:
    """The error in the shape of the API that owns `path` (for code outside the handlers)."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if path.startswith("/v1/messages"):
        # Anthropic clients parse {"type": "error", "error": {...}} on their routes.
        from .anthropic_routes import anthropic_error_response

        return anthropic_error_response(exc, headers)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _response(exc: APIError, request: Request) -> JSONResponse:
    return error_response(exc, request.url.path)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return _response(BadRequest(message, param=param), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = _BY_STATUS.get(exc.status_code, BadRequest)
        message = str(exc.detail)
        if exc.status_code == 404:
            served = sorted(request.app.openapi().get("paths", {}))
            message = (
                f"Unknown endpoint {request.method} {request.url.path}; "
                f"this server serves: {', '.join(served)}"
            )
        err = cls(message, code="not_found" if exc.status_code == 404 else None)
        err.status = exc.status_code
        return _response(err, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _response(InternalError(f"internal error: {type(exc).__name__}"), request)
