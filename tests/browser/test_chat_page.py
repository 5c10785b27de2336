"""The chat page in headless Chromium against a real server with scripted jobs.

The scripted start_job publishes stage events and a Markdown answer in
small deltas through the real EventPublisher on the real Redis, from a
thread, so the page sees a live stream.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
import redis
from servers import serve

from pipeline.events import EventPublisher, abort_key
from pipeline.job import Job
from pipeline.settings import Settings
from web.app import create_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
SCREENSHOT = "/tmp/chatpipe-page.png"

MARKDOWN_ANSWER = (
    "## Plan\n\n"
    "Here is **the** plan:\n\n"
    "- read the *input*\n"
    "- call `parse()`\n\n"
    "```python\n"
    "def parse(text):\n"
    "    return text.split()\n"
    "```\n"
)
CODE_TEXT = "def parse(text):\n    return text.split()"


def split_into_deltas(text: str, size: int = 7) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class MarkdownJobs:
    """start_job that streams MARKDOWN_ANSWER from a thread and records the jobs."""

    def __init__(self, redis_url: str, pause_s: float = 0.02, num_repeats: int = 1) -> None:
        self.redis_url = redis_url
        self.pause_s = pause_s
        self.num_repeats = num_repeats
        self.jobs: list[Job] = []

    def __call__(self, job: Job) -> None:
        self.jobs.append(job)
        threading.Thread(target=self.play, args=(job.job_id,), daemon=True).start()

    def play(self, job_id: str) -> None:
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        publisher = EventPublisher(client)
        publisher.publish(job_id, "stage", stage="context", duration_ms=1.2)
        publisher.publish(job_id, "stage", stage="intent", duration_ms=3.4, route="code", model="qwen2.5-coder-0.5b-instruct")
        for delta in split_into_deltas(MARKDOWN_ANSWER * self.num_repeats):
            if client.exists(abort_key(job_id)):
                publisher.publish(job_id, "finish", finish_reason="abort", usage={"prompt_tokens": 20, "completion_tokens": 1})
                client.close()
                return
            time.sleep(self.pause_s)
            publisher.publish(job_id, "delta", text=delta)
        publisher.publish(
            job_id, "finish", finish_reason="stop", route="code", model="qwen2.5-coder-0.5b-instruct",
            usage={"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50},
            metrics={"ttft_s": 0.12, "tpot_s": 0.025, "job_ttft_s": 0.5},
        )
        client.close()




@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing; install the Debian chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def start_page(browser, redis_url, jobs, locale="en-US"):
    """Serve the app and open the page; return (page, stack) where stack closes both."""
    stack = contextlib.ExitStack()
    settings = Settings(api_keys=(), rate_limit_per_min=0, request_timeout_s=20.0)
    base_url = stack.enter_context(serve(create_app(redis_url=redis_url, start_job=jobs, settings=settings)))
    context = browser.new_context(locale=locale, viewport={"width": 900, "height": 760})
    stack.callback(context.close)
    page = context.new_page()
    page.goto(base_url)
    return page, stack


def test_enter_streams_markdown(browser, redis_url):
    jobs = MarkdownJobs(redis_url)
    page, stack = start_page(browser, redis_url, jobs)
    with stack:
        page.fill("#input", "Show me a plan")
        page.press("#input", "Enter")

        answer = page.locator(".message.assistant .content")
        answer.locator("h2").wait_for()
        answer.locator("pre code").wait_for()
        page.wait_for_selector(".message.assistant:not(.streaming)")

        assert answer.locator("h2").inner_text() == "Plan"
        assert answer.locator("li").all_inner_texts() == ["read the input", "call parse()"]
        assert answer.locator("li em").inner_text() == "input"
        assert answer.locator("strong").inner_text() == "the"
        assert answer.locator("pre code").inner_text() == CODE_TEXT
        assert answer.locator("pre code").get_attribute("class") == "language-python"
        assert page.locator(".message.user .content").inner_text() == "Show me a plan"
        assert page.locator(".timeline li").all_inner_texts() == ["context 1.2 ms", "intent 3.4 ms"]
        meta = page.locator(".meta").inner_text()
        assert meta == "route code · model qwen2.5-coder-0.5b-instruct · first token 500 ms · 40.0 tokens/s · 30 tokens"
        assert page.input_value("#input") == ""
        assert jobs.jobs[0].messages == [{"role": "user", "content": "Show me a plan"}]
        assert jobs.jobs[0].stream is True
        page.screenshot(path=SCREENSHOT, full_page=True)


def test_second_turn_sends_conversation(browser, redis_url):
    jobs = MarkdownJobs(redis_url, pause_s=0.0)
    page, stack = start_page(browser, redis_url, jobs)
    with stack:
        page.fill("#input", "first")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant:not(.streaming)")
        page.fill("#input", "second")
        page.press("#input", "Enter")
        page.locator(".message.assistant:not(.streaming)").nth(1).wait_for()

        assert jobs.jobs[1].messages == [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": MARKDOWN_ANSWER},
            {"role": "user", "content": "second"},
        ]


def test_shift_enter_adds_newline(browser, redis_url):
    jobs = MarkdownJobs(redis_url)
    page, stack = start_page(browser, redis_url, jobs)
    with stack:
        page.click("#input")
        page.keyboard.type("line one")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("line two")
        time.sleep(0.3)

        assert page.input_value("#input") == "line one\nline two"
        assert page.locator(".message").count() == 0
        assert jobs.jobs == []


def test_ime_enter_does_not_send(browser, redis_url):
    """Enter that confirms an IME candidate (isComposing or keyCode 229) must not send the message."""
    jobs = MarkdownJobs(redis_url)
    page, stack = start_page(browser, redis_url, jobs)
    with stack:
        page.fill("#input", "nihao")
        page.evaluate(
            """() => {
                const input = document.getElementById("input");
                input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", isComposing: true, bubbles: true, cancelable: true}));
                input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", keyCode: 229, bubbles: true, cancelable: true}));
                input.dispatchEvent(new CompositionEvent("compositionstart", {bubbles: true}));
                input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true, cancelable: true}));
                input.dispatchEvent(new CompositionEvent("compositionend", {bubbles: true}));
            }"""
        )
        time.sleep(0.3)

        assert page.locator(".message").count() == 0
        assert jobs.jobs == []
        assert page.input_value("#input") == "nihao"


def test_stop_cancels_job(browser, redis_url, redis_client):
    jobs = MarkdownJobs(redis_url, pause_s=0.1, num_repeats=20)
    page, stack = start_page(browser, redis_url, jobs)
    with stack:
        page.fill("#input", "long answer please")
        page.press("#input", "Enter")
        page.locator(".message.assistant .content h2").first.wait_for()
        page.click("#stop")
        page.wait_for_selector(".message.assistant .note")

        assert page.locator(".message.assistant .note").inner_text() == "Stopped."
        assert page.locator("#send").is_visible()
        deadline = time.monotonic() + 5
        while redis_client.get(abort_key(jobs.jobs[0].job_id)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client.get(abort_key(jobs.jobs[0].job_id)) in ("cancelled", "client_disconnected")


def test_chinese_locale_strings(browser, redis_url):
    jobs = MarkdownJobs(redis_url, pause_s=0.0)
    page, stack = start_page(browser, redis_url, jobs, locale="zh-CN")
    with stack:
        assert page.locator("#send").inner_text() == "发送"
        assert page.get_attribute("#input", "placeholder") == "输入消息（Enter 发送，Shift+Enter 换行）"
        assert page.locator("#new-chat").inner_text() == "新对话"
        assert page.evaluate("document.documentElement.lang") == "zh-CN"

        page.fill("#input", "你好")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant:not(.streaming)")

        assert page.locator(".message.user .role").inner_text() == "你"
        assert page.locator(".message.assistant .role").inner_text() == "助手"
        assert page.locator(".timeline li").all_inner_texts() == ["上下文 1.2 ms", "意图 3.4 ms"]


# (Markdown source, exact HTML from the page's renderer)
RENDER_CASES = [
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ('[ok](https://a.example/?q=1&r="2")', '<p><a href="https://a.example/?q=1&amp;r=&quot;2&quot;" target="_blank" rel="noopener noreferrer">ok</a></p>'),
    ("`<b>` and **x**", "<p><code>&lt;b&gt;</code> and <strong>x</strong></p>"),
    ("```js\nlet a = '<';", '<pre class="open"><code class="language-js">let a = &#39;&lt;&#39;;</code></pre>'),
    ("3. c\n4. d", '<ol start="3"><li>c</li><li>d</li></ol>'),
    ("snake_case_name *em*", "<p>snake_case_name <em>em</em></p>"),
]


def test_markdown_renderer_escapes(browser, redis_url):
    """Model output must never become markup other than the renderer's fixed tags, and only http(s) links."""
    page, stack = start_page(browser, redis_url, MarkdownJobs(redis_url))
    with stack:
        for source, expected in RENDER_CASES:
            assert page.evaluate("(source) => renderMarkdown(source)", source) == expected
