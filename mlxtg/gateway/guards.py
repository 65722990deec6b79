"""Guards against requests that should never reach a route.

- Host check (DNS rebinding): while the server listens on loopback, a request whose Host
  header names anything but localhost, a loopback address, the bound host or an
  `allowed_hosts` entry is refused (403), since a web page that rebinds its own name to
  127.0.0.1 would send exactly that. The port is ignored (port forwards and proxies change
  it; the name is what a rebinding page cannot fake). `/health` stays open to any Host.
  Listening on another address, the operator chose to expose the server: no check.
- Body limit: a Content-Length over `max_body_bytes` is refused before any byte is read,
  and the bytes of a chunked body are counted as they arrive, so nothing over the limit is
  ever buffered (413).
- Admin POSTs take `application/json` only: a cross-site page may send text/plain, form
  or multipart bodies without a CORS preflight, never JSON.
- Per-request caps on sequences (prompts x n) and on tokens (sequences x max tokens).
"""

from __future__ import annotations

import ipaddress

from fastapi import Request
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import (
    APIError,
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)
from .settings import GatewaySettings

OPEN_PATHS = ("/health",)  # liveness probes may use any name


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1), bracketed or not."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a Host header, without port, brackets or trailing dot, lowercased."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:5001
        name = header[1 : header.find("]")] if "]" in header else header[1:]
    elif header.count(":") == 1:
        name = header.partition(":")[0]
    else:
        name = header
    return name.rstrip(".")


class HostCheck:
    """Which Host names a loopback-bound server answers to (`*` in allowed_hosts: any)."""

    def __init__(self, settings: GatewaySettings):
        allowed = [host_name(h) for h in settings.allowed_hosts]
        self.active = is_loopback(settings.host) and "*" not in allowed
        self.names = {"localhost", host_name(settings.host), *allowed}
        self.bound = settings.host

    def allows(self, header: str | None) -> bool:
        if not self.active or header is None:  # no Host: not a browser, so no rebinding
            return True
        name = host_name(header)
        return name in self.names or is_loopback(name)

    def refusal(self, header: str) -> Forbidden:
        return Forbidden(
            f"This server does not answer to Host '{header}': it listens on {self.bound} and "
            "refuses other names (a guard against DNS rebinding). To reach it under this name, "
            f"start it with `mlxtg up --allowed-host {host_name(header)}` (or list the name "
            "under allowed_hosts in models.yaml).",
            code="host_not_allowed",
        )


def too_large(limit: int) -> str:
    return (
        f"The request body is larger than this server's limit of {limit} bytes "
        f"({limit / (1 << 20):g} MiB); `mlxtg up --max-body-mb` raises it."
    )


class Guards:
    """ASGI middleware: the Host check and the body limit, before any route runs."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings):
        self.app = app
        self.hosts = HostCheck(settings)
        self.limit = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = Headers(scope=scope)
        host = headers.get("host")
        if path not in OPEN_PATHS and not self.hosts.allows(host):
            await self._refuse(self.hosts.refusal(host or ""), path, scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(PayloadTooLarge(too_large(self.limit)), path, scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _counting(self, receive: Receive) -> Receive:
        """`receive` that refuses a body (chunked, or lying) once it passes the limit."""
        seen = 0
        limit = self.limit

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException, so FastAPI's body parsing lets it through to the
                    # handlers in errors.py (413 in the route's own error shape).
                    raise HTTPException(413, too_large(limit))
            return message

        return counted

    @staticmethod
    async def _refuse(exc: APIError, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(exc, path)(scope, receive, send)


async def require_json(request: Request) -> None:
    """Admin POSTs: `Content-Type: application/json` only (no cross-site simple requests)."""
    given = request.headers.get("content-type", "")
    if given.partition(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"POST {request.url.path} takes 'Content-Type: application/json' "
            f"(got {given or 'none'!r}); send a JSON body, {{}} if it has no fields."
        )


# --- per-request caps ------------------------------------------------------------------------


async def check_request_size(
    request: Request,
    model: str,
    sequences: int,
    sequences_param: str,
    max_tokens: int | None,
    tokens_param: str,
) -> None:
    """400 when one request asks for more than `max_request_sequences` sequences, or more
    than `max_request_tokens` tokens over all of them. A request without a max tokens field
    is held only to the sequence cap: most clients leave it out, and counting each sequence
    as a long context would refuse ordinary requests (fair admission in the worker keeps
    such a request from holding the batch)."""
    settings: GatewaySettings = request.app.state.settings
    if sequences > settings.max_request_sequences:
        raise BadRequest(
            f"This request asks for {sequences} sequences; this server generates at most "
            f"{settings.max_request_sequences} per request (max_request_sequences).",
            param=sequences_param,
            code="too_many_sequences",
        )
    if max_tokens is None:
        return
    total = sequences * max_tokens
    limit = settings.max_request_tokens
    if total > limit:
        raise BadRequest(
            f"This request may generate {total} tokens ({sequences} sequences x "
            f"{tokens_param} {max_tokens}); this server allows {limit} per request "
            f"(max_request_tokens): set {tokens_param} to at most {limit // sequences}.",
            param=tokens_param,
            code="too_many_tokens",
        )
