"""The dashboard's server side in process (httpx.ASGITransport, a stub supervisor): the page
is open, its data is not; its files are served with a strict policy; /admin/status carries
the gateway's clock and last cache misses; latencies are labelled by model. The page itself
runs in a real browser in tests/test_e2e_dashboard.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from test_gateway_guards import StubSupervisor, client, openai_error

from mlxtg.gateway.app import create_app
from mlxtg.gateway.metrics import MISSES_KEPT, GatewayMetrics
from mlxtg.gateway.run import PromptFacts
from mlxtg.gateway.settings import GatewaySettings
from mlxtg.gateway.ui import STATIC

ROOT = Path(__file__).parent.parent
FILES = sorted(p.name for p in STATIC.iterdir())


@pytest.mark.parametrize("path", ["/", "/ui"])
async def test_root_and_ui_lead_to_the_page(path: str):
    async with client() as c:
        r = await c.get(path)
    assert r.status_code == 307 and r.headers["location"] == "ui/"


async def test_the_page_needs_no_key_but_its_data_does():
    async with client(api_keys=["k"]) as c:
        page = await c.get("/ui/")
        status = await c.get("/admin/status")
        with_key = await c.get("/admin/status", headers={"Authorization": "Bearer k"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "mlxtg" in page.text
    openai_error(status, 401)
    assert with_key.status_code == 200


async def test_every_file_the_page_loads_is_served_with_the_policy():
    async with client() as c:
        index = await c.get("/ui/")
        names = re.findall(r'(?:src|href)="([\w.]+\.(?:js|css))"', index.text)
        imported = set()
        for name in FILES:
            if name.endswith(".js"):
                imported |= set(re.findall(r'from "\./([\w.]+)"', (STATIC / name).read_text()))
        assert {"app.js", "style.css"} <= set(names) and imported <= set(FILES)
        for name in {*names, *imported, "index.html"}:
            r = await c.get(f"/ui/{name}")
            assert r.status_code == 200, name
            policy = r.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
            kind = {"js": "text/javascript", "css": "text/css", "html": "text/html"}
            assert r.headers["content-type"].startswith(kind[name.rsplit(".", 1)[1]])


@pytest.mark.parametrize("name", ["nope.js", "..%2Fapp.py", "%2E%2E%2Fui.py", "app.py"])
async def test_only_the_pages_files_are_served(name: str):
    async with client() as c:
        r = await c.get(f"/ui/{name}")
    assert r.status_code == 404 and "import" not in r.text


async def test_the_page_is_behind_the_host_check():
    async with client(base_url="http://evil.example:5001") as c:
        r = await c.get("/ui/")
    assert openai_error(r, 403)["code"] == "host_not_allowed"


async def test_the_ui_routes_stay_out_of_the_openapi_document():
    async with client() as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_the_page_uses_no_html_sinks_no_inline_code_and_no_cdn():
    for name in FILES:
        text = (STATIC / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, (name, sink)
        urls = re.findall(r"https?://[^\s\"'`)]+", text)
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (name, urls)
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # every script is a file
    assert not re.search(r"\son\w+=", html) and "style=" not in html


def test_the_files_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "static/*" in data["package-data"]["mlxtg.gateway"]
    assert {"index.html", "app.js", "charts.js", "style.css"} <= set(FILES)


# --- what the dashboard reads -----------------------------------------------------------------


async def test_admin_status_has_the_gateway_clock_and_its_last_misses():
    app = create_app(GatewaySettings(supervisor_endpoint="ipc:///tmp/none"))
    app.state.client = StubSupervisor()
    metrics: GatewayMetrics = app.state.metrics
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:5001") as c:
        metrics.observe_run(_run("m", "diverged_at_token_12", cached=12), 3)
        metrics.observe_run(_run("m", None, cached=30), 3)  # a clean hit: not a miss
        metrics.observe_run(_run("m", "no_match"), 3)
        r = await c.get("/admin/status")
    gateway = r.json()["gateway"]
    assert isinstance(gateway["time"], float) and isinstance(gateway["pid"], int)
    misses = gateway["cache_misses"]
    assert [m["reason"] for m in misses] == ["no_match", "diverged_at_token_12"]  # newest first
    assert misses[1] | {"time": 0} == {
        "time": 0,
        "model": "m",
        "reason": "diverged_at_token_12",
        "source": "ram",
        "cached_tokens": 12,
        "prompt_tokens": 40,
    }


def test_the_miss_ring_is_bounded():
    metrics = GatewayMetrics()
    for i in range(MISSES_KEPT + 5):
        metrics.observe_run(_run("m", f"r{i}"), 1)
    misses = metrics.recent_misses()
    assert len(misses) == MISSES_KEPT and misses[0]["reason"] == f"r{MISSES_KEPT + 4}"


def test_latencies_are_labelled_by_model():
    metrics = GatewayMetrics()
    metrics.observe_run(_run("a", None, first_token=0.25), 1)
    metrics.observe_run(_run("b", None, first_token=None), 0)  # never produced a token
    metrics.inter_token("a", 0.02)
    text = metrics.render().decode()
    assert 'mlxtg_time_to_first_token_seconds_count{model="a"} 1.0' in text
    assert 'mlxtg_inter_token_seconds_count{model="a"} 1.0' in text
    assert 'model="b"' not in text


def _run(model: str, reason: str | None, cached: int = 0, first_token: float | None = 1.0) -> Any:
    source = "ram" if cached else "none"
    facts = PromptFacts(prompt_tokens=40, cached_tokens=cached, cache_source=source)
    facts.cache_miss_reason = reason
    return SimpleNamespace(
        model=model,
        facts=[facts],
        prompt_tokens=40,
        cached_tokens=cached,
        started_at=0.0,
        first_token_at=first_token,
    )


async def test_a_bad_admin_post_from_the_page_gets_a_clear_error():
    """The page posts JSON; anything else is refused in the API's shape, never a 500."""
    async with client() as c:
        r = await c.post("/admin/load", json={})
        form = await c.post("/admin/evict", data={"model": "m"})
    assert "model is required" in openai_error(r, 400)["message"]
    assert "application/json" in openai_error(form, 415)["message"]
