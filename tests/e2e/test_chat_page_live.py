"""The chat page in headless Chromium against the whole running system and a real model."""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture
def page():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing; install the Debian chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(locale="en-US", viewport={"width": 900, "height": 760})
        yield context.new_page()
        browser.close()


def test_page_streams_a_model_answer(system, page):
    page.goto(system)
    page.fill("#input", "Describe a cat in one sentence.")
    page.press("#input", "Enter")

    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=120_000)
    answer = page.locator(".message.assistant .content").inner_text()
    meta = page.locator(".message.assistant .meta").inner_text()
    page.screenshot(path="/tmp/chatpipe-live-page.png", full_page=True)

    assert answer.strip()
    assert "route chat" in meta
    assert "smollm2-135m-instruct" in meta
    assert page.locator(".message.user .content").inner_text() == "Describe a cat in one sentence."


def test_page_greets_in_chinese(system, page):
    page.goto(system)
    page.fill("#input", "你好")
    page.press("#input", "Enter")

    page.wait_for_selector(".message.assistant:not(.streaming)", timeout=60_000)

    assert "你好" in page.locator(".message.assistant .content").inner_text()
