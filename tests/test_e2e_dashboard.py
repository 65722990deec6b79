"""The dashboard and playground in a real browser (headless chromium through Selenium and
chromium-driver) against a real `mlxtg up` with an API key: the page asks for the key
before it shows anything, lists the model and its state, a playground chat streams a reply
with its stop reason, usage and cached tokens, Evict and Load change the state.

CI installs Debian's chromium and chromium-driver (.ci/run, which sets MLXTG_REQUIRE_BROWSER):
there, or wherever CI or MLXTG_REQUIRE_BROWSER is set, a missing browser fails these tests;
elsewhere they skip. MLXTG_SCREENSHOT=docs/dashboard.png saves the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, Server, start_server
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"
WAIT_S = 120  # a bound for conditions (a model load on a busy CI machine), not a timing


def _chromium() -> tuple[str, str]:
    """The browser and its driver; without them a skip here, a failure in CI."""
    browser = next(
        (
            p
            for name in ("chromium", "chromium-browser", "google-chrome")
            if (p := shutil.which(name))
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        why = "no chromium and chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") or os.environ.get("MLXTG_REQUIRE_BROWSER"):
            pytest.fail(f"{why}, and CI needs them")
        pytest.skip(why)
    return browser, driver


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: these tests evict and reload its model."""
    _chromium()
    srv = start_server(tmp_path_factory.mktemp("dash-home"), [])
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def headless_chromium() -> Iterator[Any]:
    """A headless chromium under Selenium, quit when the generator closes (for fixtures)."""
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,860",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from headless_chromium()


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        lambda d: condition(d), message=f"waiting for {what}"
    )


def css(driver: Any, selector: str) -> Any:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found else None


def text_of(driver: Any, selector: str) -> str:
    node = css(driver, selector)
    return str(node.text) if node is not None else ""


def card_state(driver: Any) -> str:
    return text_of(driver, f'[data-model="{MODEL}"] .state')


def open_page(driver: Any, srv: Server, fragment: str = "") -> None:
    """The page, signed in: the key entered in its form when it asks."""
    driver.get(f"{srv.url}/ui/{fragment}")
    wait_for(
        driver,
        lambda d: css(d, "#auth").is_displayed() or css(d, "#app").is_displayed(),
        "the page",
    )
    if css(driver, "#auth").is_displayed():
        css(driver, "#auth-key").send_keys(API_KEY)
        css(driver, "#auth-submit").click()
    wait_for(driver, lambda d: css(d, "#app").is_displayed(), "the app after the key")


def test_the_page_asks_for_the_key_before_it_shows_anything(dash: Server, browser: Any):
    # The page is open, the data is not.
    assert httpx.get(f"{dash.url}/ui/", timeout=10).status_code == 200
    assert httpx.get(f"{dash.url}/admin/status", timeout=10).status_code == 401

    browser.get(f"{dash.url}/")  # redirected to /ui/
    browser.execute_script("sessionStorage.clear(); localStorage.clear();")
    browser.refresh()
    wait_for(browser, lambda d: css(d, "#auth").is_displayed(), "the key form")
    assert not css(browser, "#app").is_displayed()
    assert css(browser, "[data-model]") is None  # nothing was fetched without the key

    css(browser, "#auth-key").send_keys("wrong-key")
    css(browser, "#auth-submit").click()
    wait_for(browser, lambda d: "refused" in text_of(d, "#auth-error"), "the refusal")
    assert not css(browser, "#app").is_displayed()

    css(browser, "#auth-key").send_keys(API_KEY)
    css(browser, "#auth-submit").click()
    wait_for(browser, lambda d: card_state(d) == "ready", "the model card, ready")
    assert browser.execute_script("return sessionStorage.getItem('mlxtg.apiKey')") == API_KEY
    assert css(browser, "#forget-key").is_displayed()


def test_the_dashboard_shows_the_model_and_its_worker(dash: Server, browser: Any):
    open_page(browser, dash)
    wait_for(browser, lambda d: card_state(d) == "ready", "the model, ready")
    card = f'[data-model="{MODEL}"]'
    # Two requests, the second one reusing the first one's prompt: hits, and a miss reason.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 8,
    }
    for _ in range(2):
        r = httpx.post(
            f"{dash.url}/v1/chat/completions",
            json=body | {"stream": True},
            headers=dash.headers,
            timeout=60,
        )
        assert r.status_code == 200
    # "no samples yet" and "no lookups yet" until a poll sees the requests and the heartbeat.
    wait_for(
        browser, lambda d: "p50" in text_of(d, f'{card} [data-field="ttft"]'), "TTFT percentiles"
    )
    wait_for(
        browser,
        lambda d: "p50" in text_of(d, f'{card} [data-field="itl"]'),
        "inter-token percentiles",
    )
    wait_for(
        browser, lambda d: "% of" in text_of(d, f'{card} [data-field="ram"]'), "the RAM hit rate"
    )
    assert "running" in text_of(browser, f'{card} [data-field="requests"]')
    assert "RSS" in text_of(browser, f'{card} [data-field="memory"]')
    assert "now" in text_of(browser, f'{card} [data-field="tps"]')
    assert browser.find_elements("css selector", f"{card} svg.chart")
    wait_for(browser, lambda d: css(d, "#disk tbody tr") is not None, "the disk cache table")


def test_a_playground_chat_streams_a_reply(dash: Server, browser: Any):
    open_page(browser, dash, "#playground")
    wait_for(
        browser,
        lambda d: css(d, f'#pg-model option[value="{MODEL}"]') is not None,
        "the model list",
    )
    css(browser, "#pg-max-tokens").clear()
    css(browser, "#pg-max-tokens").send_keys("24")
    css(browser, "#pg-input").send_keys("hello there")
    css(browser, "#pg-send").click()
    facts = wait_for(
        browser, lambda d: _facts(d) if "finish_reason" in _facts(d) else None, "the reply's facts"
    )
    reply = css(browser, "#pg-log .msg.assistant")
    assert reply.find_element("css selector", ".text").text.strip()
    # Several events: the reply streamed (its deltas, the finish, the usage chunk).
    assert int(reply.get_attribute("data-chunks")) >= 3
    assert facts["finish_reason"] in ("stop", "length")
    assert int(facts["prompt_tokens"]) > 0 and int(facts["completion_tokens"]) > 0
    assert int(facts["cached_tokens"]) >= 0

    # A second turn reuses the first one's prompt: cached tokens come back through usage.
    css(browser, "#pg-input").send_keys("and again")
    css(browser, "#pg-send").click()
    wait_for(
        browser,
        lambda d: len(d.find_elements("css selector", "#pg-log .msg.assistant")) == 2,
        "turn 2",
    )
    facts = wait_for(browser, lambda d: _facts(d) if _done(d, 2) else None, "turn 2's facts")
    assert int(facts["cached_tokens"]) > 0


def test_the_playground_sends_a_schema_and_shows_errors(dash: Server, browser: Any):
    open_page(browser, dash, "#playground")
    wait_for(
        browser,
        lambda d: css(d, f'#pg-model option[value="{MODEL}"]') is not None,
        "the model list",
    )
    css(browser, "#pg-clear").click()
    css(browser, "details summary").click()  # open the schema box
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 12}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    css(browser, "#pg-schema").send_keys("{not json")
    css(browser, "#pg-input").send_keys("Answer in JSON")
    css(browser, "#pg-send").click()
    wait_for(
        browser,
        lambda d: "JSON schema: not valid JSON" in text_of(d, "#pg-error"),
        "the field error",
    )
    assert css(browser, "#pg-log .msg") is None  # nothing was sent

    css(browser, "#pg-schema").clear()
    css(browser, "#pg-schema").send_keys(json.dumps(schema))
    css(browser, "#pg-max-tokens").clear()
    css(browser, "#pg-max-tokens").send_keys("64")
    css(browser, "#pg-send").click()
    facts = wait_for(browser, lambda d: _facts(d) if _done(d, 1) else None, "the JSON reply")
    assert facts["finish_reason"] == "stop" and facts["JSON"] == "valid"
    answer = json.loads(css(browser, "#pg-log .msg.assistant .text").text)
    assert set(answer) == {"answer"} and len(answer["answer"]) <= 12

    # The server's own error (a 400 in OpenAI's shape: past the context) is shown, the turn
    # dropped. (max_tokens 0 would not do: the form's own min="1" stops it in the browser.)
    css(browser, "#pg-max-tokens").clear()
    css(browser, "#pg-max-tokens").send_keys("100000")
    css(browser, "#pg-input").send_keys("hi")
    css(browser, "#pg-send").click()
    wait_for(browser, lambda d: text_of(d, "#pg-error").startswith("400:"), "the server's 400")
    assert "maximum context length" in text_of(browser, "#pg-error")
    assert "failed" in css(browser, "#pg-log .msg.assistant:last-child").get_attribute("class")


def test_evict_load_and_cache_clear_from_the_dashboard(dash: Server, browser: Any):
    open_page(browser, dash)
    wait_for(browser, lambda d: card_state(d) == "ready", "the model, ready")
    card = f'[data-model="{MODEL}"]'
    if shot := os.environ.get("MLXTG_SCREENSHOT"):
        _traffic(dash, seconds=20)  # some polls' worth, so the charts have lines
        wait_for(browser, lambda d: "p50" in text_of(d, f'{card} [data-field="ttft"]'), "latencies")
        browser.set_window_size(1200, 1040)
        browser.save_screenshot(str(Path(shot)))

    css(browser, f'{card} [data-action="clear-cache"]').click()
    assert css(browser, f"{card} .confirm").is_displayed()  # asks first
    css(browser, f'{card} [data-action="confirm-clear"]').click()
    wait_for(browser, lambda d: "clear" in text_of(d, f"{card} .message"), "the clear's answer")

    css(browser, f'{card} [data-action="evict"]').click()
    wait_for(browser, lambda d: card_state(d) == "unloaded", "the model, unloaded")
    assert dash.status()["models"][0]["state"] == "unloaded"
    assert not css(browser, f'{card} [data-action="evict"]').is_displayed()

    css(browser, f'{card} [data-action="load"]').click()
    wait_for(browser, lambda d: card_state(d) == "ready", "the model, ready again")
    assert dash.status()["counters"]["model_loads"] == 2


def _facts(driver: Any) -> dict[str, str]:
    facts = {}
    for node in driver.find_elements("css selector", "#pg-meta .fact"):
        key, _, value = node.text.partition(": ")
        facts[key] = value
    return facts


def _done(driver: Any, replies: int) -> bool:
    """The `replies`-th reply finished: the send button is back and the facts are shown."""
    n = len(driver.find_elements("css selector", "#pg-log .msg.assistant"))
    return (
        n == replies and css(driver, "#pg-send").is_enabled() and "finish_reason" in _facts(driver)
    )


def _traffic(srv: Server, seconds: float, clients: int = 3) -> None:
    """Streamed chats from a few clients for a while (only for the README's screenshot)."""

    def client(i: int) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Tell me a story about cat {i}."}],
                "max_tokens": 64,
                "stream": True,
            }
            with httpx.stream(
                "POST", f"{srv.url}/v1/chat/completions", json=body, headers=srv.headers, timeout=60
            ) as r:
                for _ in r.iter_bytes():
                    pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
