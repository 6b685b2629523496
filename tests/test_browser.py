"""The demo page in headless Chromium (Debian's), driven by Playwright, for every transport."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import free_port, provider_env, require
from tests.fake_upstream import BODIES, Reply
from tests.servers import gunicorn
from tests.test_images import png

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
RESULTS = Path(__file__).resolve().parent.parent / "test-results"
STREAMING = ["sse", "postsse", "fetch", "ws"]
TEXT = ["Grüße", " aus", " Köln", " 👋", " —", " 日本語", " ok", ".", " Line", " two", " has", " more",
        " words", " in", " it", " 🚀", " and", " then", " some", " more", " text", " to", " end", " here", "!"]


@pytest.fixture(scope="session")
def browser():
    require(os.path.exists(CHROMIUM), "Debian chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda err: page.problems.append(str(err)))
    page.on("dialog", lambda dialog: (page.problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    # The page is served with a Content-Security-Policy: anything it blocks is a bug of ours.
    page.on("console", lambda message: "Content Security Policy" in message.text and page.problems.append(message.text))
    yield page
    RESULTS.mkdir(exist_ok=True)
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    page.screenshot(path=str(RESULTS / f"{name}.png"), full_page=True)
    context.close()


@pytest.fixture(scope="module")
def site(fake_upstream, tmp_path_factory):
    """The app under gunicorn (the development shape, the one that offers WebSocket)."""
    store = tmp_path_factory.mktemp("site") / "relay.sqlite3"
    server = gunicorn(free_port(), {**provider_env(fake_upstream.url), "SSE_HEARTBEAT_SECONDS": "1",
                                    "STREAM_GRACE_SECONDS": "0", "STORE_URL": f"sqlite:///{store}"})
    yield server.url
    server.stop()


def ask(page, url: str, prompt: str, transport: str = "auto", provider: str = "openai") -> None:
    page.goto(url + "/")
    page.click("#toggle-settings")
    page.select_option("#provider", provider)
    page.select_option("#transport", transport)
    # Sample the answer's length as the page sees it, every 10 ms.
    page.evaluate("""() => { window.__lengths = [];
        setInterval(() => { const b = document.querySelector('.msg.assistant:last-of-type .body');
                            if (b) window.__lengths.push(b.textContent.length); }, 10); }""")
    page.fill("#prompt", prompt)
    page.click("#send")


def answer(page):
    return page.locator(".msg.assistant").last


@pytest.mark.parametrize("transport", STREAMING + ["rest"])
def test_answer_grows_token_by_token_and_ends_exact(transport, page, site, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](TEXT), delay=0.06))
    ask(page, site, "hello", transport)
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    assert answer(page).locator(".body").text_content() == "".join(TEXT)
    lengths = page.evaluate("window.__lengths")
    intermediate = {n for n in lengths if 0 < n < len("".join(TEXT))}
    if transport != "rest":  # REST answers in one piece by definition
        assert len(intermediate) >= 5, lengths
    assert transport in answer(page).locator(".meta").text_content()
    assert page.problems == []


@pytest.mark.parametrize("transport", STREAMING)
def test_stop_button_stops_generation_on_the_server(transport, page, site, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(400)]), delay=0.03))
    ask(page, site, "go on", transport)
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20")
    page.click("#stop")
    seen = upstream.wait_for_request()
    assert seen.closed.wait(3), "the upstream kept generating after Stop"
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=5_000)
    assert page.is_visible("#send") and page.is_hidden("#stop")
    assert page.problems == []


@pytest.mark.parametrize("transport", STREAMING)
def test_upstream_error_is_shown_in_place(transport, page, site, upstream):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["partial ", "answer"], error_after=1)))
    ask(page, site, "hi", transport, provider="anthropic")
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=10_000)
    shown = answer(page).locator(".error").text_content()
    # Our words, naming the provider; the upstream's own message goes to the log only.
    assert "anthropic reported an error" in shown and "Overloaded" not in shown
    assert answer(page).locator(".body").text_content() == "partial "


def test_http_error_before_the_stream_is_shown(page, live, upstream):
    body = b'{"error": {"message": "Incorrect API key provided"}}'
    upstream.reset(Reply(status=401, content_type="application/json", chunks=[body]))
    ask(page, live(), "hi", "fetch")
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=10_000)
    shown = answer(page).locator(".error").text_content()
    assert "credentials (HTTP 401)" in shown and "Incorrect API key provided" not in shown


def test_auto_picks_a_streaming_transport_and_capabilities_match_the_server(page, site, live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["a", "b"])))
    ask(page, site, "hi", "auto")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=10_000)
    assert answer(page).locator(".meta").text_content().startswith("postsse")
    page.goto(site + "/")
    assert "ws" in page.evaluate("JSON.parse(document.getElementById('capabilities').textContent).transports")
    page.goto(live() + "/")  # werkzeug's development server: no WebSocket offered
    assert "ws" not in page.evaluate("JSON.parse(document.getElementById('capabilities').textContent).transports")


def test_model_output_cannot_inject_html(page, live, upstream):
    evil = ["<img src=x onerror=alert(1)>", " and ", "<script>alert(2)</script>", " **bold** [x](javascript:alert(3))"]
    upstream.reset(Reply(chunks=BODIES["openai"](evil)))
    ask(page, live(), "hi", "fetch")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=10_000)
    body = answer(page).locator(".body")
    assert "<img src=x onerror=alert(1)>" in body.text_content()
    assert "<script>alert(2)</script>" in body.text_content()
    assert body.locator("img, script").count() == 0
    assert body.locator("a").count() == 0  # javascript: links are not links
    assert body.locator("strong").text_content() == "bold"
    page.wait_for_timeout(300)
    assert page.problems == []


def test_demo_works_offline_with_markdown_and_history_survives_reload(page, make_app, serve, upstream):
    url = serve(make_app(DEMO_TOKENS_PER_SECOND=100))
    page.goto(url + "/")
    page.fill("#prompt", "tell me about apache")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    assert answer(page).locator(".body strong").count() >= 1  # **Apache + mod_wsgi**
    assert answer(page).locator(".body ol li").count() == 3
    assert "first token" in answer(page).locator(".meta").text_content()
    page.reload()
    assert page.locator(".msg.user").text_content() == "tell me about apache"
    assert "mod_deflate" in answer(page).text_content()


def test_phone_width_layout(browser, live):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(live() + "/")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    RESULTS.mkdir(exist_ok=True)
    page.screenshot(path=str(RESULTS / "phone-width.png"))
    context.close()


def test_tool_activity_shows_inline_and_conversation_continues_on_the_server(page, site, upstream):
    page.goto(site + "/")
    page.click("#toggle-settings")
    page.select_option("#provider", "demo")
    page.check("#tools")
    page.fill("#prompt", "what is 6 * 7 ?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    note = answer(page).locator(".tool").text_content()
    assert "calculate" in note and "42" in note
    assert "42" in answer(page).locator(".body").text_content()
    # The next turn goes to a real provider with the stored history, not the page's copy.
    upstream.reset(Reply(chunks=BODIES["openai"](["fine"])))
    page.select_option("#provider", "openai")
    page.uncheck("#tools")
    page.fill("#prompt", "and now?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state=done]", timeout=20_000)
    sent = upstream.last().body["messages"]
    # The stored exchange, tool call and result included, in the new provider's format.
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[0]["content"] == "what is 6 * 7 ?" and sent[1]["tool_calls"][0]["function"]["name"] == "calculate"
    page.reload()
    page.wait_for_selector(".msg.assistant >> nth=1")
    assert page.locator(".msg.user").count() == 2
    assert "calculate" in page.locator(".tool").first.text_content()


def test_page_works_with_auth_on(page, make_app, serve):
    url = serve(make_app(API_TOKENS="page-token", DEMO_TOKENS_PER_SECOND=200))
    page.goto(url + "/")
    assert page.is_visible("#token")  # asked for first
    page.fill("#prompt", "hi")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=10_000)
    assert "access token" in answer(page).locator(".error").text_content()
    page.fill("#token", "page-token")
    page.dispatch_event("#token", "change")
    for transport in ("postsse", "fetch", "sse", "rest"):
        page.select_option("#transport", transport)
        page.fill("#prompt", f"hi over {transport}")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant:last-of-type[data-state=done]", timeout=10_000)
        assert answer(page).locator(".meta").text_content().startswith(transport)
    page.reload()  # the conversation comes back from the server, with the stored token
    page.wait_for_selector(".msg.user >> nth=3")
    assert page.locator(".msg.user").count() == 4  # the refused first prompt was never accepted


def test_postsse_gives_up_when_the_server_is_gone(page, fake_upstream, upstream, tmp_path):
    """EventSource retries forever; the client must reject so the page does not hang."""
    upstream.reset(Reply(chunks=BODIES["openai"](["first"]), stall_after=3))
    server = gunicorn(free_port(), {**provider_env(fake_upstream.url), "SSE_HEARTBEAT_SECONDS": "1",
                                    "STORE_URL": f"sqlite:///{tmp_path}/relay.sqlite3"})
    try:
        page.goto(server.url + "/")
        page.evaluate("""async () => {
            const { EventTransportClient } = await import("/static/transport.js");
            const client = new EventTransportClient({transport: "postsse", resumeTimeout: 1500,
                                                     payload: {provider: "openai", prompt: "hi"}});
            window.__outcome = null; window.__text = "";
            client.connect((event, data) => { if (event === "token") window.__text += data.text; })
                  .then(() => { window.__outcome = "resolved"; }, (err) => { window.__outcome = err.type; });
        }""")
        page.wait_for_function("() => window.__text === 'first'", timeout=10_000)
    finally:
        server.stop()
    page.wait_for_function("() => window.__outcome !== null", timeout=15_000)
    assert page.evaluate("window.__outcome") == "network_error"


def test_a_prompt_too_long_for_a_get_url_goes_by_post(page, site, upstream):
    """gunicorn answers 414 past its request line limit: the client switches transports itself."""
    upstream.reset(Reply(chunks=BODIES["openai"](["long ", "prompt ", "ok"])))
    page.goto(site + "/")
    assert page.evaluate("JSON.parse(document.getElementById('capabilities').textContent).max_url_bytes") == 8190
    result = page.evaluate("""async () => {
        const { EventTransportClient } = await import("/static/transport.js");
        let text = "";
        const client = new EventTransportClient({transport: "sse",
                                                 payload: {provider: "openai", prompt: "x".repeat(9000)}});
        await client.connect((event, data) => { if (event === "token") text += data.text; });
        return {used: client.used, text};
    }""")
    assert result == {"used": "postsse", "text": "long prompt ok"}
    assert len(upstream.last().body["messages"][0]["content"]) == 9000


def test_reasoning_streams_in_a_thinking_block_that_folds_when_the_answer_starts(page, make_app, serve):
    url = serve(make_app(DEMO_TOKENS_PER_SECOND=60))
    page.goto(url + "/")
    page.click("#toggle-settings")
    page.select_option("#reasoning", "medium")
    # Sample what the page shows, every 10 ms: reasoning must be visible before any answer text.
    page.evaluate("""() => { window.__seen = [];
        setInterval(() => { const m = document.querySelector('.msg.assistant');
            if (!m) return;
            const t = m.querySelector('.thinking-text'), d = m.querySelector('.thinking');
            window.__seen.push([t ? t.textContent.length : 0, m.querySelector('.body').textContent.length,
                                d ? d.open : null]); }, 10); }""")
    page.fill("#prompt", "why is the sky blue?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    seen = page.evaluate("window.__seen")
    assert any(thought > 0 and text == 0 and is_open for thought, text, is_open in seen), sorted(set(map(tuple, seen)))
    block = answer(page).locator(".thinking")
    thinking = block.locator(".thinking-text").text_content()
    assert thinking.strip()
    assert block.evaluate("d => d.open") is False
    assert block.locator("summary").text_content().startswith("Thought for")
    body = answer(page).locator(".body").text_content()
    assert body.strip() and thinking not in body  # the reasoning is never part of the answer
    page.reload()  # the record keeps the reasoning apart: it comes back folded
    page.wait_for_selector(".msg.assistant .thinking")
    assert page.locator(".msg.assistant .thinking-text").text_content() == thinking
    assert page.locator(".msg.assistant .body").text_content() == body
    assert page.problems == []


def test_an_image_attached_by_button_paste_or_drop_reaches_the_model(page, make_app, serve):
    url = serve(make_app(DEMO_TOKENS_PER_SECOND=200))
    page.goto(url + "/")
    page.set_input_files("#image-input", files=[{"name": "a.png", "mimeType": "image/png", "buffer": png(3, 2)}])
    page.wait_for_selector("#attachments .attachment img.thumb")
    page.fill("#prompt", "what is this?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    assert page.locator(".msg.user img.thumb").get_attribute("src").startswith("data:image/png;base64,")
    assert page.is_hidden("#attachments")
    described = answer(page).locator(".body").text_content()
    assert "PNG" in described and "3×2" in described, described

    # Paste, then drop, an image into the same conversation (files built in the page).
    for how in ("paste", "drop"):
        page.evaluate("""async ([how, bytes]) => {
            const file = new File([new Uint8Array(bytes)], "b.png", {type: "image/png"});
            const data = new DataTransfer(); data.items.add(file);
            const target = document.getElementById(how === "paste" ? "prompt" : "composer");
            const event = how === "paste" ? new ClipboardEvent("paste", {clipboardData: data, bubbles: true})
                                          : new DragEvent("drop", {dataTransfer: data, bubbles: true});
            target.dispatchEvent(event);
        }""", [how, list(png(5, 4))])
        page.wait_for_selector("#attachments .attachment img.thumb")
        page.fill("#prompt", f"and this one ({how})?")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant:last-of-type[data-state=done]", timeout=20_000)
        assert "5×4" in answer(page).locator(".body").text_content()
    assert page.locator(".msg.user img.thumb").count() == 3
    page.reload()  # the stored conversation shows its images again
    page.wait_for_selector(".msg.user img.thumb >> nth=2")
    assert page.problems == []


def test_a_file_that_is_not_an_image_is_refused_on_the_page(page, live):
    page.goto(live() + "/")
    page.set_input_files("#image-input", files=[{"name": "x.svg", "mimeType": "image/svg+xml",
                                                  "buffer": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}])
    assert "only PNG, JPEG, GIF or WebP" in page.locator("#attachments .note").text_content()
    assert page.locator("#attachments img").count() == 0
    assert page.problems == []


@pytest.mark.parametrize("transport", STREAMING + ["rest"])
def test_every_transport_carries_the_reasoning_apart_from_the_answer(transport, page, site):
    page.goto(site + "/")
    page.click("#toggle-settings")
    page.select_option("#provider", "demo")
    page.select_option("#transport", transport)
    page.select_option("#reasoning", "low")
    page.fill("#prompt", "hello there")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=20_000)
    thinking = answer(page).locator(".thinking-text").text_content()
    assert thinking.strip() and thinking not in answer(page).locator(".body").text_content()
    assert page.problems == []
