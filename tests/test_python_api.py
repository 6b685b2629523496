"""The Python API for app authors: sse_response/EventStream, ask_stream, task()."""

import threading

import pytest

from app.errors import ApiError
from app.python_api import ask, ask_stream, task
from app.sse import EventStream, sse_response
from tests.conftest import open_stream, text_of
from tests.fake_upstream import BODIES, Reply


def test_custom_routes_with_the_builder_and_event_stream(upstream, make_app, serve):
    upstream.reset(Reply(chunks=BODIES["openai"](["ha", "iku"])))
    app = make_app()

    @app.get("/haiku")
    def haiku():
        return task("openai").system("You write haiku.").prompt("autumn").temperature(0.3).max_tokens(40).stream()

    @app.get("/count")
    def count():
        return sse_response(("n", {"i": i}) for i in range(3))

    @app.get("/pushed")
    def pushed():
        stream = EventStream()

        def work():
            stream.comment("starting")
            for piece in ask_stream("hi", model="demo-fast"):
                stream.push("token", {"text": piece})
            stream.finish({"finish_reason": "stop"})

        with app.app_context():
            threading.Thread(target=work).start()
        return sse_response(stream)

    url = serve(app)
    events = open_stream(f"{url}/haiku").read_all()
    assert text_of(events) == "haiku" and events[-1].event == "done"
    assert upstream.last().body["messages"][0] == {"role": "system", "content": "You write haiku."}
    assert [e.data for e in open_stream(f"{url}/count").read_all()] == [{"i": 0}, {"i": 1}, {"i": 2}]
    events = open_stream(f"{url}/pushed").read_all()
    assert text_of(events).startswith("You asked") and events[-1].event == "done"


def test_ask_and_ask_stream_in_an_app_context(upstream, make_app):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["whole ", "answer"])))
    with make_app().app_context():
        assert ask("q", provider="anthropic") == "whole answer"
        assert task().provider("anthropic").prompt("q").ask() == "whole answer"
        with pytest.raises(ApiError):
            ask("", provider="anthropic")


def test_closing_ask_stream_early_closes_the_upstream(upstream, make_app):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(100)]), delay=0.05))
    with make_app().app_context():
        pieces = ask_stream("q", provider="openai")
        assert next(pieces) == "0 "
        pieces.close()
    assert upstream.last().closed.wait(2)


def test_an_existing_flask_app_serves_the_relay_with_init_app(upstream):
    """Issue 21: one composition root. `init_app` builds the relay on an app the caller made,
    through the factory's path (its checks too), and the Python API uses that app's service."""
    from flask import Flask

    from app.config import ConfigError
    from app.factory import init_app
    from app.python_api import current_service
    from tests.conftest import app_config

    app = Flask("host_app")
    service = init_app(app, app_config(upstream.url))
    client = app.test_client()
    assert client.post("/api/chat", json={"prompt": "hi", "model": "demo-fast"}).status_code == 200
    assert client.post("/api/nope").status_code == 404
    assert client.get("/").status_code == 200
    with app.app_context():
        assert current_service() is service
        assert ask("hi", model="demo-fast")
    with pytest.raises(ConfigError, match="LLM_PROVIDER"):
        init_app(Flask("other_app"), app_config(upstream.url, LLM_PROVIDER="no-such-provider"))


def test_the_builder_asks_for_reasoning_and_sends_images(make_app):
    """Every option of the HTTP API reaches the Python API: `reasoning` streams as its own
    events (and `.ask()` is the answer without it); an image part is checked and seen."""
    from tests.test_images import PNG_URL

    app = make_app()
    with app.test_request_context():
        events = b"".join(task("demo").reasoning("low").prompt("why?").stream().response).decode()
        assert "event: reasoning" in events and "event: token" in events
        answer = task("demo").message("user", [{"type": "text", "text": "what is it?"},
                                               {"type": "image_url", "image_url": {"url": PNG_URL}}]).ask()
        assert "a PNG image of 3×2 pixels" in answer
        with pytest.raises(ApiError):
            task("demo").reasoning("extreme").prompt("x").ask()
