"""Fuzzing every route of a live server with generated bodies, query strings and headers.

Property, for every request Hypothesis can think of: no 5xx, every 4xx is the one JSON
error shape, every 200 stream ends as its wire says (`done` or `error`; `[DONE]` on `/v1`
and the AI SDK route), and the server stays healthy (answers /healthz at once afterwards).
`/v1` and `/api/chat/ui` also get mostly well-formed tool exchanges (calls, results, parts,
ids and arguments of every size and depth), and the GET query's JSON field JSON of every
shape, so the fuzz reaches the budget and the adapters, not only the shape checks. Bounded
in examples, so the layer takes well under a minute; `FUZZ_EXAMPLES` raises the count for a longer hunt.
"""

from __future__ import annotations

import json
import os
import string
from urllib.parse import urlsplit

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
# Tool exchanges and content parts as hostile clients of /v1 and /api/chat/ui send them: ids,
# names and arguments of any size and shape, arguments nested past any limit.
tool_ids = st.sampled_from(["call_1", "x" * 129, "x" * 5000, ""]) | st.text(max_size=10) | hostile_text | json_values
tool_names = st.sampled_from(["f", "calculate", "get_weather", "n" * 65, "", "a.b"]) | json_values
arguments = st.one_of(json_values.map(json.dumps), hostile_text, st.sampled_from(
    ["", "{", "[" * 3000, '{"a":' * 70 + "1" + "}" * 70, '"' + "[" * 500 + '"', json.dumps({"city": "Paris"})]))
tool_calls = st.lists(st.fixed_dictionaries({"id": tool_ids, "type": st.just("function") | json_values,
                                             "function": st.fixed_dictionaries({"name": tool_names,
                                                                                "arguments": arguments})
                                             | json_values}) | json_values, max_size=3)
openai_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"])
                                                       | json_values},
                                              optional={"text": hostile_text | json_values,
                                                        "image_url": json_values}), max_size=3)
openai_contents = st.text(max_size=20) | st.text(max_size=20) | openai_parts | st.none() | json_values
openai_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": openai_contents}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": openai_contents},
                          optional={"tool_calls": tool_calls}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": tool_ids, "content": openai_contents}))
# Mostly well-formed lists, so the fuzz gets past the shape checks to the budget and the adapters.
openai_messages = st.one_of(st.lists(openai_message, max_size=4), st.lists(openai_message, max_size=4),
                            st.lists(openai_message | json_values, max_size=4)
                            ).map(lambda ms: [*ms, {"role": "user", "content": "hi"}])
tool_definitions = st.lists(st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "calculate", "n" * 65]) | tool_names},
                                       optional={"description": hostile_text | st.just("d" * 3000),
                                                 "parameters": st.just({"type": "object"}) | json_values})}),
    max_size=4)
tool_exchanges = st.fixed_dictionaries(
    {"model": st.sampled_from(["demo/demo-fast", "openai/gpt-4.1"]),
     "messages": openai_messages},
    optional={"stream": st.booleans(), "tools": tool_definitions | json_values, "store": st.booleans() | json_values,
              "tool_choice": st.sampled_from(["auto", "none", "required", None, {"type": "function", "function": "x"},
                                              {"type": "function", "function": None}, {"type": "function"},
                                              {"type": "function", "function": {"name": "f"}}, ["auto"], 1]),
              "stop": st.lists(hostile_text | st.just("s" * 1000), max_size=5) | json_values})
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | hostile_text})
                      | st.fixed_dictionaries({"type": st.sampled_from(["step-start", "file", "data-x"])},
                                              optional={"text": json_values}), max_size=3)
tool_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | json_values}),
    st.fixed_dictionaries({"type": tool_names.map(lambda n: f"tool-{n}") | st.just("dynamic-tool"),
                           "toolCallId": tool_ids,
                           "state": st.sampled_from(["output-available", "output-error", "input-available"])},
                          optional={"toolName": tool_names, "input": json_values, "output": json_values,
                                    "errorText": json_values}),
    st.fixed_dictionaries({"type": st.sampled_from(["step-start", "reasoning", "file", "data-x", "source-url"])},
                          optional={"text": json_values, "url": json_values})), max_size=5)
ui_message = st.one_of(
    st.fixed_dictionaries({"id": st.just("m"), "role": st.sampled_from(["user", "system"]), "parts": text_parts}),
    st.fixed_dictionaries({"id": st.just("a"), "role": st.just("assistant"), "parts": tool_parts}),
    st.fixed_dictionaries({"id": st.just("a"), "role": st.just("assistant"), "parts": tool_parts}))
ui_exchanges = st.fixed_dictionaries(
    {"id": st.just("chat"), "messages": st.lists(ui_message, max_size=4).map(
        lambda ms: [*ms, {"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}])},
    optional={"provider": st.sampled_from(["demo", "openai"]), "store": st.booleans() | json_values,
              "system": hostile_text, "tools": st.sampled_from([True, ["calculate"]])})
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
# The GET query's JSON field (`messages`) and list field (`tools`), as JSON text of any shape.
query_json = st.one_of(json_values.map(json.dumps), known["messages"].map(json.dumps), query_values, st.sampled_from(
    ["[" * 3000, "[" * 3000 + "]" * 3000, '[{"role": "user", "content": "\\ud800"}]', "null", "[]", "{}",
     '[{"role": "user", "content": "hi"}]', '[{"role": "user", "content": "' + "x" * 3000 + '"}]']))
json_queries = st.fixed_dictionaries({"messages": query_json}, optional={
    "tools": st.sampled_from(["true", "calculate", "calculate,nope", "", ",,,"]) | query_values,
    "system": query_values, "provider": st.sampled_from(["demo", "openai", "anthropic"]),
    "prompt": query_values})
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


# POST /v1/responses: every field, items of every kind, and each wire's own end of stream.
response_parts = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "input_image", "output_text", "refusal", "input_file"]) | json_values},
    optional={"text": json_values, "refusal": json_values, "image_url": st.sampled_from(
        ["data:image/png;base64,AAAA", "https://x/y.png", "http://x"]) | json_values}),
    max_size=3)
input_items = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference"])
     | json_values},
    optional={"role": st.sampled_from(["user", "assistant", "system", "developer", "x"]) | json_values,
              "content": json_values | response_parts, "call_id": st.just("call_1") | json_values,
              "name": st.just("get_weather") | json_values, "arguments": st.just("{}") | json_values,
              "output": json_values | response_parts}), min_size=1, max_size=4)
responses_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["demo/demo-fast", "openai/gpt-4.1", "smart"]) | json_values,
     "input": st.one_of(st.just("hi"), hostile_text, input_items, json_values)},
    optional={"stream": st.booleans() | json_values, "background": st.booleans() | json_values,
              "store": st.booleans() | json_values, "instructions": json_values,
              "tools": json_values | st.lists(st.fixed_dictionaries(
                  {"type": st.just("function"), "name": st.sampled_from(["get_weather", "bad name"]) | json_values},
                  optional={"parameters": json_values, "strict": json_values, "description": json_values}),
                  max_size=2),
              "tool_choice": json_values | st.sampled_from(["auto", "required", {"type": "function",
                                                                                 "name": "get_weather"}]),
              "reasoning": json_values | st.fixed_dictionaries({}, optional={
                  "effort": st.sampled_from(["low", "xhigh", "max"]) | json_values,
                  "summary": st.sampled_from(["auto", "x"]) | json_values}),
              "previous_response_id": json_values | st.sampled_from(["resp_" + "A" * 22, "resp_", "x"]),
              "max_output_tokens": json_values, "temperature": json_values, "metadata": json_values,
              "text": json_values, "include": json_values, "bogus": json_values})
# Mostly valid requests too, so the fuzz reaches the relay, the stores and the readers of a log.
plausible_responses = st.fixed_dictionaries(
    {"model": st.sampled_from(["demo/demo-fast", "openai/gpt-4.1"]),
     "input": st.sampled_from(["hi", [{"role": "user", "content": "hi"}],
                               [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]]) | hostile_text},
    optional={"stream": st.booleans(), "background": st.booleans(), "store": st.booleans(),
              "instructions": hostile_text, "tool_choice": st.sampled_from(["auto", "none"]),
              "reasoning": st.sampled_from([{"effort": "low", "summary": "auto"}, {"effort": "none"}]),
              "max_output_tokens": st.integers(1, 100), "temperature": st.floats(0, 2),
              "metadata": st.just({"k": "v"}), "tools": st.just([{"type": "function", "name": "get_weather"}])})
retrieve_queries = st.dictionaries(st.sampled_from(["stream", "starting_after", "include", "x"]),
                                   st.sampled_from(["true", "false", "0", "3", "-1", "99999999999999"]) | query_values,
                                   max_size=3)
RESPONSE_ENDINGS = ("event: response.completed", "event: response.failed", "event: response.incomplete")


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
        if urlsplit(response.request.url).path in ("/v1/chat/completions", "/api/chat/ui"):  # their own wires
            assert body.rstrip().endswith("data: [DONE]"), body[-300:]
        elif urlsplit(response.request.url).path.startswith("/v1/responses"):
            last = body.rstrip().rsplit("\n\n", 1)[-1]
            assert last.split("\n")[0] in RESPONSE_ENDINGS, body[-300:]
        else:
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
@given(body=tool_exchanges, hdrs=headers)
def test_openai_tool_exchanges(server, body, hdrs):
    send("POST", server + "/v1/chat/completions", data=json.dumps(body), headers=hdrs)


@FUZZ
@given(body=ui_exchanges, hdrs=headers)
def test_ui_tool_parts(server, body, hdrs):
    send("POST", server + "/api/chat/ui", data=json.dumps(body), headers=hdrs)


@FUZZ
@given(query=queries, hdrs=headers)
def test_query_string_streams(server, query, hdrs):
    send("GET", server + "/api/chat/stream", params=query, headers=hdrs)


@FUZZ
@given(query=json_queries, hdrs=headers)
def test_query_json_fields(server, query, hdrs):
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


@FUZZ
@given(body=plausible_responses | responses_bodies, hdrs=headers, query=retrieve_queries)
def test_responses(server, body, hdrs, query):
    """The Responses API: a created response is retrieved, replayed from any point and cancelled."""
    response = send("POST", server + "/v1/responses", data=json.dumps(body), headers=hdrs)
    if response.status_code == 200 and response.headers["Content-Type"].startswith("application/json"):
        url = f"{server}/v1/responses/{response.json()['id']}"
        send("GET", url, params=query, headers=hdrs)
        send("POST", url + "/cancel", headers=hdrs)


@FUZZ
@given(response_id=ids.map(lambda i: "resp_" + i) | ids, hdrs=headers, query=retrieve_queries,
       method=st.sampled_from(["GET", "POST", "DELETE"]), cancel=st.booleans())
def test_response_ids(server, response_id, hdrs, query, method, cancel):
    send(method, f"{server}/v1/responses/{response_id}" + ("/cancel" if cancel else ""), params=query, headers=hdrs)
