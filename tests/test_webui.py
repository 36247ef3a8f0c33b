"""The browser chat page (ember/server/webui) in headless Chromium, against a real `ember serve`.

Needs Debian's chromium (`make test` installs it when it can) and the playwright package; without them the
browser test is skipped with the reason. Screenshots (1280×800 and 390×844) are saved when it fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.server_helpers import make_tiny_chat_model, start_server

KEY = "webui-test-key"
MARKDOWN = ("# Title\n\nSome **bold** and `x<y`\n\n```python\nprint(\"<b>hi</b>\")\n```\n- one\n- two\n\n"
            "[a link](https://example.com/?a=1&b=2) <img src=x onerror=alert(1)>")
CHROMIUM = next((p for p in (os.environ.get("EMBER_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and Path(p).exists()), None)


def metric(url: str, name: str, model: str) -> int:
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    found = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', metrics, re.M)
    assert found, f"no {name} for {model} in /metrics"
    return int(float(found.group(1)))


def kv_blocks_used(url: str, model: str) -> int:
    return metric(url, "ember_kv_blocks_used", model)


def wait_for(condition, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, testdata):
    # The bundled model is the default; a second tiny model (random weights: it rarely stops by itself, so a
    # long reply can be stopped mid-stream) is listed through $EMBER_MODELS_PATH as local/tiny-chat.
    models = tmp_path_factory.mktemp("webui-models")
    make_tiny_chat_model(models / "tiny-chat", testdata)
    proc = start_server(None, api_key=KEY, extra_env={"EMBER_MODELS_PATH": str(models)})
    yield proc
    proc.stop()


def test_page_is_served_without_key_and_apis_stay(server):
    printed = server.output()
    assert f"Web UI   {server.url}/" in printed and f"API      {server.url}/v1 (OpenAI)" in printed
    assert "loaded ember-default from " in printed and "warning" not in printed  # loopback: no warning
    page = httpx.get(f"{server.url}/", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and '<script type="module" src="/ui/app.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("markdown.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{server.url}/ui/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
    assert httpx.get(f"{server.url}/ui/..%2F__init__.py", timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/ui/secret.py", timeout=10).json()["error"]["code"] == "not_found"
    # Non-browser clients still get Ollama's answer at /, and the APIs still want the key.
    assert httpx.get(f"{server.url}/", timeout=10).text == "ember is running"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{server.url}/api/tags", timeout=10).status_code == 401


def test_no_webui():
    from fastapi.testclient import TestClient

    from ember.cli.main import build_parser
    from ember.server.app import create_app
    from ember.server.state import ServerState, Settings

    assert build_parser().parse_args(["serve", "--no-webui"]).webui is False
    assert build_parser().parse_args(["serve"]).webui is True
    client = TestClient(create_app(ServerState(Settings(webui=False, api_key=KEY))),  # no lifespan: no model
                        base_url="http://127.0.0.1")
    answer = client.get("/", headers={"Accept": "text/html", "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and answer.text == "ember is running"
    assert client.get("/", headers={"Accept": "text/html"}).status_code == 401  # no open page without the UI
    assert client.get("/ui/app.js", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("BROWSER TEST SKIPPED: no chromium (apt-get install chromium; `make test` does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="BROWSER TEST SKIPPED: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_chat_in_the_browser(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        _chat_session(page, server.url)
    except BaseException:
        shots = Path(os.environ.get("EMBER_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        for width, height in ((1280, 800), (390, 844)):
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_timeout(500)  # the sidebar slides away on narrow screens
            page.screenshot(path=str(shots / f"webui-{width}x{height}.png"), full_page=True)
        print(f"screenshots of the failure in {shots}")
        raise


def _chat_session(page, url: str) -> None:
    page.goto(url)
    # The API wants a key: the page asks for it once and keeps it.
    page.wait_for_selector("#key-dialog[open]", timeout=15000)
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("body[data-ready]", timeout=15000)
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert "ember-default" in models and "local/tiny-chat" in models, models
    assert page.input_value("#model") == "ember-default"

    # A short answer from the bundled model, streamed: the Stop button shows while it arrives.
    page.fill("#input", "Tell me about the sea.")
    page.click("#send")
    page.wait_for_selector("#stop:not([hidden])", timeout=10000)
    page.wait_for_selector(".message.assistant .meta", timeout=60000)
    first = page.inner_text(".message.assistant .content")
    assert first.strip(), "the first answer is empty"
    assert re.search(r"TTFT \d+ ms", page.inner_text(".message.assistant .stats"))
    assert page.is_hidden("#stop") and page.is_visible("#send")

    # Switch to the second model and stop a long answer mid-stream: the server frees its KV blocks.
    page.select_option("#model", "local/tiny-chat")
    page.click("#toggle-settings")
    page.fill("#max_tokens", "3000")
    page.dispatch_event("#max_tokens", "change")
    page.fill("#input", "Write a very long story.")
    page.click("#send")
    wait_for(lambda: page.eval_on_selector_all(".message.assistant .content",
                                               "els => els.length === 2 && els[1].textContent.length > 20"),
             60, "the second answer to stream")
    assert page.is_visible("#stop")
    assert kv_blocks_used(url, "local/tiny-chat") > 0  # the sequence holds blocks while it streams
    page.click("#stop")
    page.wait_for_selector(".message.assistant:nth-child(4) .meta", timeout=10000)
    assert "stopped" in page.inner_text(".message.assistant:nth-child(4) .stats")
    wait_for(lambda: kv_blocks_used(url, "local/tiny-chat") == 0, 15, "the KV blocks of the stopped reply")
    assert kv_blocks_used(url, "ember-default") == 0
    # Stopped, not finished: the server aborted the sequence long before its 3000 tokens.
    assert metric(url, "ember_generation_tokens_total", "local/tiny-chat") < 3000

    # The conversation survives a reload (localStorage), with its model and both answers.
    page.reload()
    page.wait_for_selector("body[data-ready]", timeout=15000)
    assert page.locator("#conversations li").count() == 1
    assert page.inner_text("#conversations li .title") == "Tell me about the sea."
    texts = page.eval_on_selector_all(".message", "els => els.map(e => e.className)")
    assert texts == ["message user", "message assistant"] * 2, texts
    assert page.inner_text(".message.assistant .content") == first
    assert page.input_value("#model") == "local/tiny-chat"

    # Markdown from a model is rendered, and HTML in it stays text (a stored reply, so the text is exact).
    page.evaluate("""() => {
        const all = JSON.parse(localStorage.getItem('ember.conversations'));
        all[0].messages.push({role: 'assistant', content: MARKDOWN, reasoning: 'step one', stats: {}});
        localStorage.setItem('ember.conversations', JSON.stringify(all));
    }""".replace("MARKDOWN", json.dumps(MARKDOWN)))
    page.reload()
    page.wait_for_selector("body[data-ready]", timeout=15000)
    last = page.locator(".message.assistant").last
    assert last.locator("h1").inner_text() == "Title" and last.locator("strong").inner_text() == "bold"
    assert last.locator("pre code.language-python").inner_text() == 'print("<b>hi</b>")'
    assert last.locator("li").all_inner_texts() == ["one", "two"]
    assert last.locator("a").get_attribute("href") == "https://example.com/?a=1&b=2"
    assert last.locator("img").count() == 0 and "<img src=x onerror=alert(1)>" in last.inner_text()
    assert not last.locator("details.reasoning").get_attribute("open")  # folded
    assert last.locator("details.reasoning").inner_text().strip() == "Reasoning"
