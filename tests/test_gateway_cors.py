"""CORS is off by default and, with --cors-origin, answers preflights (in-process gateway)."""

from __future__ import annotations

import httpx
import pytest

from mlxtg.gateway.app import create_app
from mlxtg.gateway.settings import GatewaySettings

UI = "http://ui.example:3000"
PREFLIGHT = {
    "Origin": UI,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def client(origins: list[str]) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(supervisor_endpoint="ipc:///tmp/none", cors_origins=origins))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:5001")


@pytest.mark.parametrize("origins", [[UI], ["*"]])
async def test_preflight_and_simple_requests_get_cors_headers(origins):
    async with client(origins) as c:
        pre = await c.options("/v1/chat/completions", headers=PREFLIGHT)
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] in (UI, "*")
        assert "POST" in pre.headers["access-control-allow-methods"]
        health = await c.get("/health", headers={"Origin": UI})
        assert health.headers["access-control-allow-origin"] in (UI, "*")


async def test_cors_is_off_by_default_and_other_origins_are_not_allowed():
    async with client([]) as c:
        health = await c.get("/health", headers={"Origin": UI})
        assert "access-control-allow-origin" not in health.headers
    async with client(["http://other.example"]) as c:
        pre = await c.options("/v1/chat/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in pre.headers
