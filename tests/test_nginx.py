"""nginx for real: apache/nginx.conf in front of gunicorn, every transport through it,
compression only where wanted (Debian's nginx, started by the test on a free port)."""

from __future__ import annotations

import json
import os
import re
import shutil

import openai
import pytest
import requests

from tests.conftest import close_ws, free_port, open_stream, provider_env, require, text_of
from tests.fake_upstream import BODIES, Reply
from tests.servers import gunicorn, nginx
from tests.test_apache import PACED, STREAM_ROUTES, ask_slow_answers, assert_streams_incrementally

pytestmark = pytest.mark.nginx


@pytest.fixture(scope="module")
def front(fake_upstream, tmp_path_factory):
    require(bool(shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")), "nginx (apt-get install nginx)")
    store = tmp_path_factory.mktemp("nginx") / "relay.sqlite3"
    backend = gunicorn(free_port(), {**provider_env(fake_upstream.url), "SSE_HEARTBEAT_SECONDS": "1",
                                     "STORE_URL": f"sqlite:///{store}", "TRUSTED_PROXIES": "1"})
    proxy = nginx(free_port(), backend.url)
    yield proxy.url
    proxy.stop()
    backend.stop()


@pytest.mark.parametrize("route", list(STREAM_ROUTES))
def test_streams_arrive_token_by_token_uncompressed(route, front, upstream):
    assert_streams_incrementally(front, upstream, route=route)


def test_post_sse_and_fetch_streaming(front, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](PACED), delay=0.05))
    ticket = requests.post(f"{front}/api/chat/streams", json={"provider": "openai", "prompt": "hi"}, timeout=10).json()
    reader = open_stream(front + ticket["stream_url"], headers={"Accept-Encoding": "gzip"})
    assert text_of(reader.read_all()) == "".join(PACED) and "Content-Encoding" not in reader.response.headers
    upstream.reset(Reply(chunks=BODIES["openai"](PACED), delay=0.1))
    fetched = open_stream(f"{front}/api/chat/stream", json_body={"provider": "openai", "prompt": "hi"},
                          headers={"Accept-Encoding": "gzip"})
    events = fetched.read_all()
    assert text_of(events) == "".join(PACED) and "Content-Encoding" not in fetched.response.headers
    tokens = [e.at for e in events if e.event == "token"]
    assert tokens[-1] - tokens[0] > 0.1 * (len(PACED) - 2)  # spread out as the upstream sent them, not one burst


def test_websocket_through_nginx(front, upstream):
    from simple_websocket import Client

    assert "ws" in requests.get(f"{front}/api/capabilities", timeout=10).json()["transports"]
    upstream.reset(Reply(chunks=BODIES["openai"](["over ", "a ", "socket"])))
    ws = Client.connect(front.replace("http", "ws") + "/api/chat/ws")
    received = ""
    try:
        ws.send(json.dumps({"provider": "openai", "prompt": "hi"}))
        while "event: done" not in received:
            received += ws.receive(timeout=10) or ""
    finally:
        close_ws(ws)
    texts = [json.loads(line[6:])["text"] for line in received.split("\n") if line.startswith("data: {\"text\"")]
    assert "".join(texts) == "over a socket"


def test_openai_and_ai_sdk_routes_stream_uncompressed(front, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](PACED), delay=0.05))
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="openai/gpt-4.1", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(PACED)
    upstream.reset(Reply(chunks=BODIES["openai"](PACED), delay=0.05))
    body = {"id": "c", "provider": "openai", "messages": [{"id": "u", "role": "user",
                                                          "parts": [{"type": "text", "text": "hi"}]}]}
    response = requests.post(f"{front}/api/chat/ui", json=body, headers={"Accept-Encoding": "gzip"}, timeout=20)
    assert "Content-Encoding" not in response.headers and response.text.rstrip().endswith("data: [DONE]")


def test_page_script_and_json_are_gzipped(front):
    for path in ("/", "/static/transport.js", "/static/style.css", "/api/capabilities"):
        response = requests.get(front + path, headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert response.status_code == 200 and response.headers.get("Content-Encoding") == "gzip", path


def test_the_request_id_is_nginx_s_never_the_client_s(front, upstream):
    """Finding (issue 20): the app takes X-Request-ID from a trusted proxy (TRUSTED_PROXIES=1),
    and nginx passed the client's on, so callers chose the ids on the relay's log lines (and
    could give theirs another request's id). nginx sets its own, $request_id."""
    chosen = {"X-Request-ID": "chosen-by-the-client"}
    upstream.reset(Reply(chunks=BODIES["openai"](["a"])))
    for response in (requests.get(f"{front}/api/capabilities", headers=chosen, timeout=10),
                     requests.post(f"{front}/api/chat", json={"provider": "openai", "prompt": "hi"}, headers=chosen,
                                   timeout=10),
                     requests.get(f"{front}/api/chat/stream?provider=openai&prompt=hi", headers=chosen, timeout=10)):
        assert response.ok
        given = response.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", given), given  # nginx's $request_id, the same in its own logs
    msgid = next(line for line in response.text.split("\n") if line.startswith("data: {\"id\""))
    assert json.loads(msgid[6:])["request_id"] == given


def test_slow_answers_that_are_not_streamed_are_not_cut(fake_upstream, upstream):
    """Finding (issue 20): a completion without `stream` (and the REST answer) sends nothing
    until the model is done; nginx's read timeout for the streams (60 s, fed by heartbeats) cut
    it with a 504 while gunicorn went on generating. Here every 60 s timeout is 2 s, the answers'
    own 20 s, and the answers take 4 s."""
    backend = gunicorn(free_port(), {**provider_env(fake_upstream.url), "STORE_URL": "memory://",
                                     "TRUSTED_PROXIES": "1"})
    proxy = nginx(free_port(), backend.url, edits={"proxy_read_timeout 60s;": "proxy_read_timeout 2s;",
                                                   "proxy_read_timeout 600s;": "proxy_read_timeout 20s;"})
    try:
        ask_slow_answers(proxy.url, upstream)
    finally:
        proxy.stop()
        backend.stop()
