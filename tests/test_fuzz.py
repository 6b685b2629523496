"""Fuzzing every route of a live server with generated bodies, query strings and headers.

Property, for every request Hypothesis can think of: no 5xx, every 4xx is the one JSON
error shape, every 200 stream ends with `done` or `error`, and the server stays healthy
(answers /healthz at once afterwards). Bounded in examples, so the layer takes well
under a minute; `FUZZ_EXAMPLES` raises the count for a longer hunt.
"""

from __future__ import annotations

import json
import os
import string

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import BODIES, Reply

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKEN = "fuzz-token"

# Text as hostile clients send it: any code point, lone surrogates included (JSON escapes them).
hostile_text = st.text(st.characters(codec=None, categories=None), max_size=40)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | hostile_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(hostile_text, inner, max_size=4), max_leaves=12)
known = {
    "prompt": st.one_of(hostile_text, json_values, st.just("hi")),
    "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]), "content": json_values}),
        max_size=3)),
    "system": json_values,
    "provider": st.sampled_from(["demo", "openai", "anthropic", "nope", "", "openai-compatible"]) | json_values,
    "model": st.sampled_from(["demo-fast", "demo-fast\n", "gpt-4.1", "../x"]) | json_values,
    "temperature": json_values | st.sampled_from([0, 2, 2.5, -1, "1"]),
    "max_tokens": json_values | st.sampled_from([1, 0, 10**9, 1.5]),
    "conversation_id": json_values | st.sampled_from(["1", "A" * 22, "x\n"]),
    "tools": json_values | st.sampled_from([True, ["calculate"], ["nope"], "calculate"]),
}
chat_bodies = st.one_of(
    st.fixed_dictionaries({"prompt": st.just("hi"), "model": st.just("demo-fast")},
                          optional={k: v for k, v in known.items() if k not in ("prompt", "model")}),
    st.fixed_dictionaries({}, optional=known),
    st.fixed_dictionaries({"prompt": st.just("hi"), "model": st.just("demo-fast")},
                          optional={k: v for k, v in known.items() if k not in ("prompt", "model")}),
    st.dictionaries(hostile_text, json_values, max_size=4),
    json_values,
)
openai_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["demo/demo-fast", "openai/gpt-4.1", "nope/x", "smart"]) | json_values,
     "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "assistant", "tool", "developer", "x"]), "content": json_values},
         optional={"tool_calls": json_values, "tool_call_id": json_values}), min_size=1, max_size=3))},
    optional={"stream": st.booleans() | json_values, "stream_options": json_values, "tools": json_values,
              "tool_choice": json_values, "n": json_values, "stop": json_values, "max_tokens": json_values,
              "temperature": json_values, "logprobs": json_values, "bogus": json_values})
ui_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "tool-calculate", "file", "step-start"])
                                                   | json_values},
                                          optional={"text": json_values, "state": st.sampled_from(
                                              ["output-available", "output-error", "input-streaming"]),
                                              "toolCallId": json_values, "input": json_values, "output": json_values}),
                    max_size=3)
ui_bodies = st.fixed_dictionaries(
    {"id": json_values, "messages": st.lists(st.fixed_dictionaries(
        {"id": json_values, "role": st.sampled_from(["user", "assistant", "system", "x"]), "parts": ui_parts}),
        min_size=1, max_size=3)},
    optional={"trigger": json_values, "provider": st.sampled_from(["demo", "openai"]), "tools": json_values,
              "model": st.just("demo-fast")})
raw_bodies = st.one_of(
    ui_bodies.map(lambda value: json.dumps(value).encode()),
    openai_bodies.map(lambda value: json.dumps(value).encode()),
    chat_bodies.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"prompt": "\\ud800"}', b"\xef\xbb\xbf{}", b"{" * 100]),
)
query_values = st.text(string.printable, max_size=30) | st.sampled_from(["%ff", "%ED%A0%80", "\u00b2", "-1", "1e9"])
queries = st.dictionaries(st.sampled_from(list(known) + ["access_token", "last_event_id", "x"]), query_values,
                          max_size=5)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(str.strip)
hostile_headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                                     "multipart/form-data", "application/x-www-form-urlencoded"]) | header_values,
    "Authorization": st.sampled_from([f"Bearer {TOKEN}", "Bearer ", "Basic abc", "Bearer a.b.c"])
    | header_values.map(lambda v: "Bearer " + v),
    "Last-Event-ID": st.sampled_from(["0", "3", "999999999999", "²", "-1", ""]) | header_values,
    "Origin": st.sampled_from(["https://evil.example", "null", "http://127.0.0.1"]) | header_values,
    "Sec-Fetch-Site": st.sampled_from(["same-origin", "cross-site", "none"]),
})
GOOD = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
# Mostly requests that pass the front door's outer checks, so the fuzz reaches validation,
# the relay and the stores; the rest hostile in every header.
headers = st.one_of(st.just(GOOD), hostile_headers.map(lambda extra: {**GOOD, **extra}), hostile_headers)
ids = st.sampled_from(["A" * 22, "short", "x" * 70, "..", "%0A", "a%00b"]) | st.text(string.ascii_letters + "-_",
                                                                                      min_size=1, max_size=30)


@pytest.fixture(scope="module", params=["open", "auth"])
def server(request, fake_upstream):
    """The app under a real server, with auth off and with auth on."""
    from app import create_app
    from tests.conftest import LiveServer, app_config

    extra = {"API_TOKENS": TOKEN, "JWT_SECRET": "fuzz-secret-of-sufficient-length"} if request.param == "auth" else {}
    app = create_app(app_config(fake_upstream.url, DEMO_TOKENS_PER_SECOND=100_000, UPSTREAM_MAX_RETRIES=0,
                                MAX_STREAMS_PER_CLIENT=0, MAX_TICKETS_PER_CLIENT=0, MAX_READERS_PER_CLIENT=0,
                                MAX_PROMPT_CHARS=2000,
                                ANTHROPIC_API_KEY="", GEMINI_API_KEY="", GROQ_API_KEY="", MISTRAL_API_KEY="",
                                OPENAI_COMPATIBLE_BASE_URL="", **extra))
    live = LiveServer(app)
    yield live.url
    live.stop()


@pytest.fixture(autouse=True)
def openai_answers(fake_upstream):
    fake_upstream.reset(Reply(chunks=BODIES["openai"](["o", "k"])))


def check(response: requests.Response) -> None:
    """The property every answer must have."""
    status = response.status_code
    assert status < 500, (status, response.request.method, response.request.url, response.text[:300])
    if 400 <= status < 500 and response.request.method != "HEAD":
        assert response.headers.get("Content-Type", "").startswith("application/json"), response.text[:200]
        error = response.json()["error"]
        assert isinstance(error["type"], str) and isinstance(error["message"], str) and error["message"]
    elif response.headers.get("Content-Type", "").startswith("text/event-stream"):
        body = response.content.decode()
        assert body.rstrip().endswith("}") and ("event: done" in body or "event: error" in body), body[-300:]


def send(method: str, url: str, **kwargs) -> requests.Response:
    response = requests.request(method, url, timeout=20, **kwargs)
    check(response)
    return response


@FUZZ
@given(body=raw_bodies, hdrs=headers, route=st.sampled_from(["/api/chat", "/api/chat/stream", "/api/chat/streams",
                                                              "/v1/chat/completions", "/api/chat/ui"]))
def test_json_routes(server, body, hdrs, route):
    response = send("POST", server + route, data=body, headers=hdrs)
    if route == "/api/chat/streams" and response.status_code == 201:
        ticket = response.json()
        send("GET", server + ticket["stream_url"], headers=hdrs)
        send("DELETE", server + ticket["stream_url"], headers=hdrs)


@FUZZ
@given(query=queries, hdrs=headers)
def test_query_string_streams(server, query, hdrs):
    send("GET", server + "/api/chat/stream", params=query, headers=hdrs)


@FUZZ
@given(stream_id=ids, conversation_id=ids, hdrs=headers, method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]))
def test_id_routes(server, stream_id, conversation_id, hdrs, method):
    send(method, f"{server}/api/chat/streams/{stream_id}", headers=hdrs)
    send(method, f"{server}/api/conversations/{conversation_id}", headers=hdrs)


@FUZZ
@given(hdrs=headers, path=st.sampled_from(["/", "/healthz", "/api/capabilities", "/api/nothing", "/static/chat.js",
                                           "/api/chat/ws", "/v1/models"]),
       method=st.sampled_from(["GET", "POST", "OPTIONS", "HEAD", "PATCH"]))
def test_every_other_route(server, hdrs, path, method):
    send(method, server + path, headers=hdrs)


def test_server_stays_healthy_after_the_fuzz(server):
    # Runs after the fuzz tests of this server (same module-scoped fixture): nothing spins or hangs.
    for _ in range(5):
        response = requests.get(server + "/healthz", timeout=2)
        assert response.json() == {"status": "ok"}
