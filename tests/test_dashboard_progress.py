"""Load progress on the dashboard: the page, in headless chromium, fed a made-up
GET /admin/status by the real gateway over a stub supervisor (no worker, no model). A
loading model's `progress` shows its phase, a bar when the percent is known, the count done
and the time spent in the phase; the line goes away once the model is ready.

Needs chromium and chromedriver like tests/test_e2e_dashboard.py (skips without them,
fails without them in CI)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from conftest import free_port
from test_e2e_dashboard import css, headless_chromium, text_of, wait_for
from test_gateway_guards import StubSupervisor

from mlxtg.gateway.app import create_app
from mlxtg.gateway.settings import GatewaySettings


def _model(name: str, state: str, progress: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "pinned": False,
        "source": f"/models/{name}",
        "quant": "q4",
        "context_length": 4096,
        "worker": None,
        "waiting": 0,
        "progress": progress,
    }


def _progress(phase: str, done: Any, total: Any, unit: str, percent: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "done": done,
        "total": total,
        "unit": unit,
        "elapsed_s": 12.3,
        "percent": percent,
    }


class LoadingSupervisor(StubSupervisor):
    """A status with several models loading (the supervisor's shape), changed by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.models = [
            _model("quant", "loading", _progress("quantize", 17, 40, "layers", 42.5)),
            _model(
                "down", "loading", _progress("download", 1536 * 1024**2, 4 * 1024**3, "bytes", 37.5)
            ),
            _model("start", "loading", _progress("starting", None, None, "", None)),
            _model("idle", "unloaded", None),
        ]

    async def control(self, op: str, args: Any = None, timeout: float = 5.0) -> Any:
        reply = await super().control(op, args, timeout)
        if op == "status":
            reply.data = {
                "version": "test",
                "models": [dict(m) for m in self.models],
                "counters": {},
                "supervisor": {"uptime": 60.0},
            }
        return reply


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from headless_chromium()


@pytest.fixture()
def stub() -> LoadingSupervisor:
    return LoadingSupervisor()


@pytest.fixture()
def page(stub: LoadingSupervisor) -> Iterator[str]:
    """The real gateway app, over the stub, served by uvicorn in a thread (no lifespan: the
    stub stands in for the supervisor connection)."""
    app = create_app(GatewaySettings(supervisor_endpoint="ipc:///tmp/none"))
    app.state.client = stub
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            pytest.fail("the test gateway did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/ui/"
    server.should_exit = True
    thread.join(timeout=10)


def progress_of(driver: Any, model: str) -> Any:
    return css(driver, f'[data-model="{model}"] .progress')


def test_a_loading_model_shows_its_phase_percent_count_and_elapsed_time(
    page: str, browser: Any, stub: LoadingSupervisor
):
    browser.get(page)
    wait_for(browser, lambda d: css(d, '[data-model="idle"]') is not None, "the model cards")

    quant = progress_of(browser, "quant")
    assert quant.is_displayed() and quant.get_attribute("data-phase") == "quantize"
    assert text_of(browser, '[data-model="quant"] [data-field="progress"]') == (
        "quantizing · 42% · 17/40 layers · 12.3 s in this phase"
    )
    bar = quant.find_element("css selector", "svg.bar")
    assert bar.get_attribute("aria-valuenow") == "42"
    fill = float(bar.find_element("css selector", "rect.fill").get_attribute("width"))
    track = float(bar.find_element("css selector", "rect.track").get_attribute("width"))
    assert fill == pytest.approx(0.425 * track, abs=0.1)
    assert text_of(browser, '[data-model="quant"] .state') == "loading"

    # A download counts bytes.
    assert text_of(browser, '[data-model="down"] [data-field="progress"]') == (
        "downloading · 37% · 1.5 GB of 4.0 GB · 12.3 s in this phase"
    )

    # No percent yet: the phase and the time, no bar.
    assert text_of(browser, '[data-model="start"] [data-field="progress"]') == (
        "starting the worker · 12.3 s in this phase"
    )
    assert not progress_of(browser, "start").find_elements("css selector", "svg.bar")

    # Not loading: no progress line.
    assert not progress_of(browser, "idle").is_displayed()

    # Live: the next phase, then ready (progress null) and the line goes away.
    stub.models[0] = _model("quant", "loading", _progress("warmup", None, None, "", 100.0))
    wait_for(
        browser,
        lambda d: progress_of(d, "quant").get_attribute("data-phase") == "warmup",
        "the next phase",
    )
    assert text_of(browser, '[data-model="quant"] [data-field="progress"]') == (
        "warming up · 100% · 12.3 s in this phase"
    )
    stub.models[0] = _model("quant", "loaded", None)
    wait_for(browser, lambda d: not progress_of(d, "quant").is_displayed(), "the line gone")
    assert text_of(browser, '[data-model="quant"] .state') == "ready"


def test_an_unknown_phase_is_shown_as_it_comes(page: str, browser: Any, stub: LoadingSupervisor):
    stub.models = [_model("m", "loading", _progress("verify", 3, None, "files", None))]
    browser.get(page)
    wait_for(browser, lambda d: progress_of(d, "m") is not None, "the card")
    assert text_of(browser, '[data-model="m"] [data-field="progress"]') == (
        "verify · 3 files · 12.3 s in this phase"
    )
