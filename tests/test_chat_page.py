"""The chat page at `/`, driven in headless Chromium (Debian's `chromium`, which `make test`
installs, through Playwright) against a live lookup server with an API key: load, a bad key's
message, a streamed reply coloured by where its tokens came from, stop mid-stream with the
server's slot freed, the keyboard, a narrow window. And the stream extension behind the
colours: off unless asked, the normal stream byte for byte unchanged without it."""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest

from tests.conftest import API_KEY, start_server, stop_server

REPEAT = ("Repeat this sentence twice: the quick brown fox jumps over the lazy dog near the "
          "river bank.")
SOURCES = {"target", "draft", "lookup", "forced"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # lookup verifying every proposal (no budget): a repeated sentence is accepted at once
    server = start_server("--draft", "ngram", "--no-adaptive-budget", "--max-concurrency", "2",
                          log_path=tmp_path_factory.mktemp("logs") / "server.log")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("Debian's chromium is missing: `make test` installs it "
                    "(apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


def stream_lines(live, **options) -> list[str]:
    body = {"model": "m", "messages": [{"role": "user", "content": REPEAT}], "max_tokens": 40,
            "temperature": 0, "stream": True, **options}
    with httpx.stream("POST", live.v1 + "/chat/completions", json=body, headers=live.headers,
                      timeout=120) as response:
        return [line for line in response.iter_lines() if line]


def normalised(line: str, drop: str | None = None) -> str:
    """A chunk line without its request's id and time (and without `drop`)."""
    if line == "data: [DONE]":
        return line
    chunk = json.loads(line.removeprefix("data: "))
    chunk.pop(drop, None)
    chunk["id"], chunk["created"] = "id", 0
    return "data: " + json.dumps(chunk, ensure_ascii=False)


def test_without_the_extension_the_stream_is_unchanged_byte_for_byte(server):
    """On the plain server (one token per step: the same chunks every time)."""
    plain = stream_lines(server)
    assert all("speculation" not in line for line in plain)
    # json.dumps with the server's separators reproduces each chunk: byte-level equality
    assert [normalised(line) for line in plain] == [
        re.sub(r'"id": "[^"]*", "object"', '"id": "id", "object"',
               re.sub(r'"created": \d+', '"created": 0', line)) for line in plain]
    off = stream_lines(server, stream_options={"include_speculation": False})
    assert [normalised(line) for line in off] == [normalised(line) for line in plain]
    on = stream_lines(server, stream_options={"include_speculation": True})
    assert [normalised(line, drop="speculation") for line in on] == \
        [normalised(line) for line in plain]


def test_the_extension_says_where_every_token_came_from(live):
    chunks = [json.loads(line.removeprefix("data: ")) for line in
              stream_lines(live, stream_options={"include_speculation": True})
              if line != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    tokens = [t for c in chunks if "speculation" in c for t in c["speculation"]["tokens"]]
    steps = [n for c in chunks if "speculation" in c for n in c["speculation"]["steps"]]
    assert "".join(t["text"] for t in tokens) == text
    assert {t["source"] for t in tokens} <= SOURCES
    assert any(t["source"] == "lookup" for t in tokens)  # the sentence repeats
    assert sum(steps) >= len(tokens) and max(steps) > 1


def wait_until(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_chat_page_in_a_browser(live, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(live.base_url + "/")
    assert page.title() == "Dovetail chat"
    page.wait_for_function("document.getElementById('status').textContent.includes('threads')")
    assert "draft lookup" in page.inner_text("#status")

    # 5. a bad API key (none, then a wrong one): a clear message
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.error")
    assert "API key" in page.inner_text(".message.error")
    page.fill("#api-key", "wrong-key")
    page.dispatch_event("#api-key", "change")
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.message.error').length === 2")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('status').textContent.includes('model')")

    # 2, 3. a streamed reply, coloured by where its tokens came from
    page.fill("#prompt", REPEAT)
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant .body span")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
    reply = page.inner_text(".message.assistant .body")
    assert "quick brown fox" in reply
    assert page.locator(".message.assistant .tok-lookup").count() > 0
    assert page.locator(".message.assistant .tok-target").count() > 0
    assert page.inner_text("#tau") != "–" and float(page.inner_text("#tau")) > 1.0
    assert page.locator("#sparkline polyline").count() == 1
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    # 4. stop mid-stream: the server frees the slot
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.message.assistant')[1]?.innerText.length > 40",
        timeout=120_000)
    assert httpx.get(live.base_url + "/health").json()["active_requests"] == 1
    page.click("#stop")
    page.wait_for_function("!document.getElementById('send').disabled")
    wait_until(lambda: httpx.get(live.base_url + "/health").json()["active_requests"] == 0,
               seconds=10)
    assert "stopped" in page.inner_text(".message.assistant >> nth=1").lower()

    # the keyboard: Shift+Enter is a new line, Enter sends
    messages = page.locator(".message").count()
    page.fill("#prompt", "")
    page.type("#prompt", "first")
    page.keyboard.press("Shift+Enter")
    page.type("#prompt", "second")
    assert page.input_value("#prompt") == "first\nsecond"
    assert page.locator(".message").count() == messages

    # a narrow window: everything still within it
    page.fill("#prompt", "")
    page.set_viewport_size({"width": 400, "height": 760})
    page.screenshot(path=str(tmp_path / "chat-400px.png"), full_page=True)
    for selector in ("#send", "#stop", "#prompt", "#conversation"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 400, selector
    assert (tmp_path / "chat.png").stat().st_size > 0
    assert (tmp_path / "chat-400px.png").stat().st_size > 0
    page.close()
