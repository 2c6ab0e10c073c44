"""The built-in chat page in a real headless browser: the answer streams in, Stop ends it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_util import live_server, wait_ready

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def page_url(runtime_bundle: Path):
    with live_server(runtime_bundle) as (url, state):
        wait_ready(url)
        yield url, state


@pytest.fixture()
def page(page_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(page_url[0] + "/")
            sync_api.expect(page.locator("#model option")).to_have_text(["tiny"], timeout=15_000)
            yield page
        finally:
            browser.close()


def test_the_answer_streams_in_and_tokens_per_second_are_shown(page) -> None:
    page.fill("#max-tokens", "24")
    page.fill("#input", "Hello there")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator(".message.user")).to_have_text("Hello there")
    answer = page.locator(".message.assistant").first
    sync_api.expect(page.locator("#status")).to_contain_text("tokens/s", timeout=20_000)
    assert answer.inner_text().strip()  # the streamed text reached the page
    tokens = int(page.inner_text("#status").split(" tokens,")[0])
    assert 1 <= tokens <= 24  # the usage chunk's count, within the requested max tokens


def test_stop_ends_a_long_answer(page, page_url, monkeypatch) -> None:
    import time

    batcher = page_url[1].models["tiny"].batcher
    decode = batcher.engine.decode

    def like_a_bigger_model(*args, **kwargs):  # the tiny model finishes 100 tokens before a click lands
        time.sleep(0.02)
        return decode(*args, **kwargs)

    monkeypatch.setattr(batcher.engine, "decode", like_a_bigger_model)
    page.fill("#max-tokens", "")  # empty: until the context is full
    page.fill("#temperature", "1.5")
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    answer = page.locator(".message.assistant").first
    sync_api.expect(answer).not_to_have_text("", timeout=20_000)  # streamed text has appeared
    page.click("#stop")
    sync_api.expect(page.locator("#status")).to_have_text("stopped", timeout=10_000)
    assert answer.get_attribute("data-stopped") == "true"
    page.wait_for_function("() => !document.getElementById('send').disabled")
    for _ in range(100):
        if batcher.active == 0:
            break
        page.wait_for_timeout(20)
    assert batcher.active == 0  # the server cancelled the generation when the page hung up
