"""The chat page in a real headless Chromium (Debian's `chromium`, driven by Playwright; Playwright never
downloads a browser here): a question typed and sent, the answer streamed under a collapsible thinking
block, the sampling settings and API key used, Stop and New chat, and nothing fetched from elsewhere. A
screenshot is saved under pytest's temp folder and its path printed."""

from __future__ import annotations

import json
import shutil

import pytest
from serving import Server

from pocketr1.serve.toy import SCRIPT, random_model, scripted_model

THOUGHT, ANSWER = SCRIPT.split("</think>")
KEY = "sk-page-key"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    script = Server(scripted_model(root / "script"))
    rand = Server(random_model(root / "rand", context=2048), "--api-key", KEY)
    yield script, rand
    for server in (script, rand):
        server.stop()
        assert "Traceback" not in server.stderr, server.stderr


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the page test needs Debian's chromium (`apt-get install -y chromium`; `make test` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, server, password: str | None = None):
    login = {"http_credentials": {"username": "me", "password": password}} if password else {}
    page = browser.new_page(viewport={"width": 900, "height": 700}, **login)
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server.url, "data:")) else outside.append(r.url))
    page.goto(server.url + "/")
    return page, outside


def test_question_streams_answer_under_collapsible_thinking(browser, servers, tmp_path):
    from playwright.sync_api import expect

    script, _ = servers
    page, outside = open_page(browser, script)
    expect(page.locator("#model")).to_contain_text("script")
    page.fill("#input", "What is 1+2?")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".answer")).to_have_text(ANSWER)
    expect(page.locator(".msg.user")).to_have_text("What is 1+2?")
    thinking = reply.locator("details.thinking")
    expect(thinking.locator(".thought")).to_have_text(THOUGHT)
    expect(thinking.locator("summary")).to_contain_text("Thought for")
    assert thinking.evaluate("d => !d.open")  # folded away once the answer came
    thinking.locator("summary").click()
    assert thinking.evaluate("d => d.open")
    expect(thinking.locator(".thought")).to_be_visible()
    expect(page.locator("#send")).to_be_visible()
    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG")
    print(f"\nscreenshot: {shot}")
    # A second turn goes back with the first answer only (the server refuses thinking sent back).
    page.fill("#input", "And 2+2?")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant .answer")).to_have_count(2)
    expect(page.locator(".msg.assistant .answer").last).to_have_text(ANSWER)
    expect(page.locator("#error")).to_be_hidden()
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    assert outside == [], outside


def test_settings_key_stop_button(browser, servers, tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    _, rand = servers
    page = browser.new_page()
    with pytest.raises(PlaywrightError, match="AUTH"):  # --api-key guards the page too: a login with no answer
        page.goto(rand.url + "/")
    page.close()
    page, outside = open_page(browser, rand, password=KEY)  # the prompt answered with the key
    expect(page.locator("#model")).to_contain_text("rand")  # the page's own API calls carry that login
    page.click("#settings-toggle")  # a key in the settings is sent as a bearer token instead
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model")).to_contain_text("rand")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#max-tokens", "2000")
    page.dispatch_event("#max-tokens", "change")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#input", "Count for me.")
        page.click("#send")
    body = json.loads(sent.value.post_data)
    assert (body["temperature"], body["max_tokens"], body["stream"]) == (0, 2000, True)
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    thought = page.locator(".msg.assistant .thought")
    expect(thought).not_to_be_empty()  # streaming: text shows while the reply is still running
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    expect(page.locator(".msg.assistant .note")).to_have_text("[stopped]")
    expect(page.locator("#send")).to_be_visible()
    assert rand.wait_idle(timeout=5)["generated_tokens"] < 2000  # the server stopped generating too
    page.screenshot(path=str(tmp_path / "web-stopped.png"))
    print(f"\nscreenshot: {tmp_path / 'web-stopped.png'}")
    page.reload()  # settings persist in the browser
    expect(page.locator("#model")).to_contain_text("rand")
    assert page.input_value("#temperature") == "0"
    assert outside == [], outside
