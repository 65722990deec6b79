"""HTTP client the operator commands use to reach a running server.

`get` and `post` end the command with one `error: ...` line and exit code 1 when the server
cannot be reached or answers with an error (a stopped server is not a traceback).
"""

from __future__ import annotations

from typing import Any

import httpx
import typer

from .. import paths


class ServerError(RuntimeError):
    """The server could not be reached, or answered with an error."""


class ServerNotFound(ServerError):
    """No server to talk to: none recorded under $MLXTG_HOME, or nothing answers."""


class ServerClient:
    def __init__(self, url: str, api_key: str | None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @classmethod
    def find(cls, url: str | None, port: int | None, api_key: str | None) -> ServerClient:
        """--url, else --port on localhost, else the server recorded under $MLXTG_HOME."""
        if url:
            return cls(url, api_key)
        if port:
            return cls(f"http://127.0.0.1:{port}", api_key)
        info = paths.read_server_info()
        if not info or not info.get("url"):
            raise ServerNotFound(
                f"no running server found under {paths.home()} (use --url or --port)"
            )
        return cls(str(info["url"]), api_key)

    def call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        """One request; raises ServerError (ServerNotFound when nothing answers)."""
        try:
            r = httpx.request(
                method, self.url + path, json=json, headers=self.headers, timeout=30.0
            )
        except httpx.HTTPError as exc:
            raise ServerNotFound(
                f"cannot reach {self.url} ({exc}); is `mlxtg up` running?"
            ) from exc
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise ServerError(f"{self.url}{path}: HTTP {r.status_code}: {message}")
        data: dict[str, Any] = r.json()
        return data

    def get(self, path: str) -> dict[str, Any]:
        return self._or_exit("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._or_exit("POST", path, body)

    def _or_exit(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        try:
            return self.call(method, path, json)
        except ServerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
