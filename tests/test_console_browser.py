"""The operator console (/ui) in a real browser, on the live `shoal serve` of tests/server_fixture.py
(stories260K, with an API key): a chat streams, the live view counts it, the stop button aborts a long
answer and the server frees it, the page without a key shows the 401, and no request leaves the server.

Debian's chromium (/usr/bin/chromium, installed by `make test` where apt-get exists and we are root),
driven by playwright with executable_path: no browser download. Where chromium or playwright is
missing the tests skip, saying why. Screenshots of the playground and the live view go to
$SHOAL_CONSOLE_SCREENSHOTS (docs/img when refreshing the docs' pictures), else to a temporary directory.
About 15 s on 2 cores, browser start included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    from server_fixture import API_KEY, live_server  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import API_KEY, live_server  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(60)
CHROMIUM = Path("/usr/bin/chromium")
# --no-sandbox: chromium refuses to run as root otherwise; the other two stop it from calling Google's
# hosts by itself (which the no-other-host check would catch).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
STEP_DELAY_S = 0.05  # fault injection: each engine step sleeps this long, so a long answer lasts seconds
WAIT_MS = 20_000


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        how = "run `apt-get install -y chromium` (make test does, as root)"
        return f"{CHROMIUM} missing: {how}"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser():
    if reason := _skip_reason():
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):
    """A fresh tab (no key stored) whose every request URL is recorded in page.requested; an uncaught
    script error fails the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.requested, page.errors = [], []
    page.on("request", lambda request: page.requested.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))  # uncaught script errors
    page.goto(live_server.url + "/ui/")
    yield page
    context.close()
    assert page.errors == []


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    wanted = os.environ.get("SHOAL_CONSOLE_SCREENSHOTS")
    path = Path(wanted) if wanted else tmp_path_factory.mktemp("console-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _enter_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


def _only_the_server(page, server_url: str) -> None:
    hosts = {urlsplit(u).netloc for u in page.requested if not u.startswith(("data:", "blob:"))}
    assert hosts == {urlsplit(server_url).netloc}, page.requested


def _running(server) -> float:
    with server.client() as client:
        return client.get("/ui/api/live").json()["running"]


def test_chat_streams_live_view_counts_it_and_stop_frees_the_request(page, live_server, screenshots):
    _enter_key(page, API_KEY)
    page.wait_for_function("() => document.getElementById('model').options.length > 0")
    page.click("#tab-live")
    page.wait_for_function("() => document.getElementById('live-requests').textContent !== '–'")
    finished_before = float(page.text_content("#live-requests"))
    page.click("#tab-playground")
    page.fill("#max_tokens", "48")
    page.fill("#seed", "7")
    page.fill("#message", "Once upon a time")
    page.click("#send")
    answer = page.locator("#conversation li.assistant").last
    page.wait_for_function(
        "() => document.querySelector('#conversation li.assistant:last-child').dataset.state === 'done'",
        timeout=WAIT_MS,
    )
    assert int(answer.get_attribute("data-chunks")) > 1  # it arrived piece by piece, not at once
    assert answer.locator(".content").text_content().strip()
    assert int(page.text_content("#stat-completion")) > 1
    assert page.text_content("#stat-ttft").endswith("ms")
    page.screenshot(path=str(screenshots / "console-playground.png"))

    page.click("#tab-live")
    page.wait_for_function(
        f"() => Number(document.getElementById('live-requests').textContent) >= {finished_before + 1}",
        timeout=WAIT_MS,
    )
    page.wait_for_function("() => document.getElementById('ttft-p50').textContent !== '–'", timeout=WAIT_MS)
    page.screenshot(path=str(screenshots / "console-live.png"))

    with live_server.client() as client:  # a slow engine, so that the long answer is still running
        client.post("/debug/faults", json={"step_delay_s": STEP_DELAY_S}).raise_for_status()
        try:
            _stop_a_long_answer(page)
            page.click("#tab-live")
            page.wait_for_function(
                "() => document.getElementById('live-running').textContent === '0'", timeout=WAIT_MS
            )
            assert _running(live_server) == 0  # the server's own count, not only the page's
        finally:
            client.post("/debug/faults", json={}).raise_for_status()
    for name in ("console-playground.png", "console-live.png"):
        assert (screenshots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _only_the_server(page, live_server.url)


def _stop_a_long_answer(page) -> None:
    page.click("#tab-playground")
    page.fill("#max_tokens", "400")
    page.check("#ignore_eos")
    page.fill("#message", "Tell me a long story")
    page.click("#send")
    page.wait_for_function(
        "() => Number(document.querySelector('#conversation li.assistant:last-child').dataset.chunks) >= 3",
        timeout=WAIT_MS,
    )
    page.click("#tab-live")
    page.wait_for_function(
        "() => document.getElementById('live-running').textContent === '1'", timeout=WAIT_MS
    )
    page.click("#tab-playground")
    page.click("#stop")
    page.wait_for_function(
        "() => document.querySelector('#conversation li.assistant:last-child').dataset.state === 'stopped'",
        timeout=WAIT_MS,
    )
    assert page.text_content("#stat-finish") == "stopped"


def test_without_a_key_the_page_says_401_and_with_one_it_works(page, live_server):
    alert = page.locator("#alert")
    alert.wait_for(state="visible", timeout=WAIT_MS)
    assert "401 Unauthorized" in alert.text_content()
    assert "API key" in alert.text_content()
    assert page.evaluate("document.activeElement.id") == "api-key"
    _enter_key(page, "not-the-key")
    page.wait_for_function("() => document.body.dataset.auth === 'needed'", timeout=WAIT_MS)
    assert "401" in page.text_content("#alert")
    _enter_key(page, API_KEY)
    page.wait_for_function("() => document.getElementById('phase').textContent === 'ready'", timeout=WAIT_MS)
    assert alert.is_hidden()
    assert page.eval_on_selector("#model", "s => s.value") == live_server.model
    page.click("#tab-models")
    page.locator("#models-table tbody th", has_text=live_server.model).wait_for(timeout=WAIT_MS)
    assert "float32" in page.text_content("#models-table tbody")
    page.click("#tab-deployments")
    page.locator("#deployments-body", has_text="--gateway-url").wait_for(timeout=WAIT_MS)
    _only_the_server(page, live_server.url)


def test_chromium_is_found_where_make_test_installs_it():
    """Here (root, apt-get) the browser tests must run, not skip."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("not root or no apt-get: make test cannot install chromium here")
    assert _skip_reason() is None
