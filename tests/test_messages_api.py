"""The Anthropic Messages API (`POST /v1/messages`), driven by the official `anthropic` Python
package and `@anthropic-ai/sdk` under Node against a live server whose upstream is the fake
provider: what the SDKs assemble equals what the upstream sent, whatever provider is behind."""

from __future__ import annotations

import base64
import importlib.util
import json

import anthropic
import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from app.protocols import AnthropicEvents, Ending
from app.providers.domain import Signed, ToolCall
from tests.conftest import require, run_node
from tests.fake_upstream import (
    BODIES,
    TRICKY_TEXT,
    Reply,
    anthropic_tool_use_body,
    gemini_function_call_body,
    hostile_chunks,
    openai_tool_call_body,
)
from tests.test_fuzz import FUZZ, check, headers, json_values, server  # noqa: F401  (server: the fuzzed app)

WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HELLO = [{"role": "user", "content": "hi"}]

# A real 1×1 PNG (the relay reads its header: a bare signature is not an image).
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")


@pytest.fixture(autouse=True)
def any_model(monkeypatch):
    """These tests name models freely (`anthropic/m`): ALLOWED_MODELS is tested in test_failover."""
    monkeypatch.setenv("ALLOWED_MODELS", "*")


@pytest.fixture
def client(live):
    url = live(MODEL_ALIASES="smart=anthropic/claude-sonnet-4-5")
    return anthropic.Anthropic(base_url=url, api_key="anything-when-auth-is-off", max_retries=0)


def frames_of(raw: str) -> list[tuple[str | None, str]]:
    """(event, data) of each SSE frame of a raw body; comments as (None, comment)."""
    out = []
    for frame in raw.replace("\r\n", "\n").split("\n\n"):
        if not frame.strip():
            continue
        fields = dict(line.split(": ", 1) if ": " in line else (line, "") for line in frame.split("\n"))
        out.append((fields.get("event"), fields.get("data", fields.get(""))))
    return out


@pytest.mark.parametrize("provider", ["anthropic", "openai", "gemini"])
def test_streamed_and_whole_answers_equal_the_upstream_text(provider, client, upstream):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    with client.messages.stream(model=f"{provider}/m", max_tokens=100, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(TRICKY_TEXT)
    assert final.id.startswith("msg_") and final.role == "assistant" and final.model == f"{provider}/m"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == text
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    whole = client.messages.create(model=f"{provider}/m", max_tokens=100, messages=HELLO)
    assert whole.type == "message" and whole.content[0].text == text and whole.stop_reason == "end_turn"
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0 and whole.id.startswith("msg_")


def test_every_event_is_named_as_its_type_and_in_order(live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["a", "b"])))
    raw = requests.post(f"{live()}/v1/messages", stream=True, timeout=10,
                        json={"model": "openai/m", "max_tokens": 10, "messages": HELLO, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    frames = frames_of(raw.text)
    assert all(name is not None for name, _ in frames), "comments or retry: fields: Anthropic clients skip them"
    names = [name for name, _ in frames]
    assert names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    for name, data in frames:
        assert json.loads(data)["type"] == name


def test_model_names_aliases_and_request_options_reach_the_provider(client, upstream):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["ok"])))
    # temperature: the current SDK has no argument for it; older ones (and their users) send it.
    answer = client.messages.create(model="smart", max_tokens=50, system="Be brief.", messages=HELLO,
                                    stop_sequences=["END"], metadata={"user_id": "u1"},
                                    cache_control={"type": "ephemeral"}, extra_body={"temperature": 0.3})
    assert answer.content[0].text == "ok" and answer.model == "smart"
    body = upstream.last().body
    assert upstream.last().path == "/v1/messages" and body["model"] == "claude-sonnet-4-5"
    assert body["system"] == "Be brief." and body["max_tokens"] == 50 and body["temperature"] == 0.3
    assert body["stop_sequences"] == ["END"] and "metadata" not in body and "cache_control" not in body
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    client.messages.create(model="openai/gpt-4.1", max_tokens=20,
                           system=[{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
                           messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    body = upstream.last().body
    assert body["messages"][0]["role"] == "system" and "One." in body["messages"][0]["content"]
    assert "Two." in body["messages"][0]["content"] and body["messages"][-1] == {"role": "user", "content": "hi"}


def test_thinking_budget_becomes_the_reasoning_effort():
    from app.messages_api import effort_of

    assert effort_of({"type": "enabled", "budget_tokens": 1024}, 4096) == "low"
    assert effort_of({"type": "enabled", "budget_tokens": 3000}, 4096) == "medium"
    assert effort_of({"type": "enabled", "budget_tokens": 10000}, 20000) == "high"
    assert effort_of({"type": "disabled"}, 4096) is None
    assert effort_of(None, 4096) is None
    assert effort_of({"type": "adaptive"}, 4096) == "medium"
    assert effort_of({"type": "adaptive", "display": "omitted"}, 4096, {"effort": "max"}) == "high"
    assert effort_of(None, 4096, {"effort": "low"}) == "low"


@pytest.mark.parametrize("provider,reply", [
    ("anthropic", lambda: anthropic_tool_use_body("toolu_1", "get_weather", '{"city": "Köln"}', text="Checking. ")),
    ("openai", lambda: openai_tool_call_body([("call_1", "get_weather", '{"city": "Köln"}')])),
    ("gemini", lambda: gemini_function_call_body("get_weather", {"city": "Köln"})),
])
def test_client_tools_round_trip_in_anthropic_shape(provider, reply, client, upstream):
    upstream.reset(Reply(chunks=reply()))
    with client.messages.stream(model=f"{provider}/m", max_tokens=100, messages=HELLO, tools=[WEATHER]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = final.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Köln"}
    declared = json.dumps(upstream.last().body.get("tools"))
    assert "get_weather" in declared and "city" in declared

    # Not streamed; then the result goes back as a tool_result block, in the provider's format.
    upstream.reset(Reply(chunks=reply()))
    whole = client.messages.create(model=f"{provider}/m", max_tokens=100, messages=HELLO, tools=[WEATHER],
                                   tool_choice={"type": "any"})
    call = whole.content[-1]
    assert whole.stop_reason == "tool_use" and call.type == "tool_use" and call.input == {"city": "Köln"}
    upstream.reset(Reply(chunks=BODIES[provider](["It is sunny."])))
    follow = [*HELLO, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in whole.content]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}]}]
    answer = client.messages.create(model=f"{provider}/m", max_tokens=100, messages=follow, tools=[WEATHER])
    assert answer.content[0].text == "It is sunny." and answer.stop_reason == "end_turn"
    sent = upstream.last().body
    assert "sunny, 21 C" in json.dumps(sent) and "get_weather" in json.dumps(sent)
    if provider == "anthropic":
        blocks = sent["messages"][-1]["content"]
        assert blocks[0]["type"] == "tool_result" and blocks[0]["tool_use_id"] == call.id
        assert sent["messages"][1]["content"][-1] == {"type": "tool_use", "id": call.id, "name": "get_weather",
                                                       "input": {"city": "Köln"}}
    if provider == "openai":
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}


def test_tool_choice_is_translated(client, upstream):
    upstream.reset(Reply(chunks=anthropic_tool_use_body("c", "get_weather", '{"city": "x"}')))
    client.messages.create(model="anthropic/m", max_tokens=10, messages=HELLO, tools=[WEATHER],
                           tool_choice={"type": "tool", "name": "get_weather"})
    assert upstream.last().body["tool_choice"] == {"type": "tool", "name": "get_weather"}
    upstream.reset(Reply(chunks=openai_tool_call_body([("c", "get_weather", "{}")])))
    client.messages.create(model="openai/m", max_tokens=10, messages=HELLO, tools=[WEATHER],
                           tool_choice={"type": "any"})
    assert upstream.last().body["tool_choice"] == "required"


def test_errors_have_anthropic_shape_and_status(client, upstream, live):
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="openai/gpt-4.1", max_tokens=10, messages=[])
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "messages" in bad.value.body["error"]["message"]
    for wrong in ({"max_tokens": None}, {"top_k": 3}, {"temperature": 1.5}, {"stream": "yes"},
                  {"tools": [{"name": "x y", "input_schema": {}}]}, {"tool_choice": {"type": "tool", "name": "nope"}},
                  {"thinking": {"type": "enabled", "budget_tokens": 100}}, {"output_config": {"format": {}}},
                  {"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 1500},
                  {"messages": [*HELLO, {"role": "assistant", "content": "prefill"}]}):
        body = {"model": "openai/gpt-4.1", "max_tokens": 10, "messages": HELLO, **wrong}
        body = {k: v for k, v in body.items() if v is not None}
        response = requests.post(f"{live()}/v1/messages", json=body, timeout=10)
        assert response.status_code == 400, (wrong, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error", wrong
    missing = anthropic.Anthropic(base_url=live(OPENAI_API_KEY=""), api_key="x", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as absent:
        missing.messages.create(model="openai/gpt-4.1", max_tokens=10, messages=HELLO)
    assert absent.value.body["error"]["type"] == "not_found_error"
    # An upstream 429: a 429 rate_limit_error in our words, never the provider's text.
    upstream.reset(Reply(status=429, content_type="application/json",
                         chunks=[b'{"error": {"message": "Rate limit reached for org-secret"}}']))
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="openai/gpt-4.1", max_tokens=10, messages=HELLO)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert "org-secret" not in json.dumps(limited.value.body)
    # Streamed: the response waits (up to a heartbeat) for the provider, so a failure before any
    # content is an HTTP error too, as Anthropic answers it, and the SDK raises its usual class.
    with pytest.raises(anthropic.RateLimitError) as limited:
        with client.messages.stream(model="openai/gpt-4.1", max_tokens=10, messages=HELLO) as stream:
            stream.get_final_message()
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    # During the stream: `event: error`, which the SDK raises.
    upstream.reset(Reply(chunks=BODIES["anthropic"](["partial ", "answer"], error_after=1)))
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client.messages.stream(model="anthropic/m", max_tokens=10, messages=HELLO) as stream:
            for _ in stream:
                pass
    assert failed.value.body["type"] == "error" and failed.value.body["error"]["type"] == "api_error"
    assert "Overloaded" not in json.dumps(failed.value.body)


@pytest.mark.parametrize("extra", [
    {"output_config": {"effort": ["high"]}},
    {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": ["get_weather"]}},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": ["x"],
                                                                            "data": "aa"}}]}]},
])
def test_unhashable_values_are_a_400_not_a_500(extra, live):
    body = {"model": "openai/gpt-4.1", "max_tokens": 100, "messages": HELLO, **extra}
    response = requests.post(f"{live()}/v1/messages", json=body, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_non_finite_tool_input_is_refused(live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    body = ('{"model": "openai/gpt-4.1", "max_tokens": 10, "messages": [{"role": "assistant", "content": '
            '[{"type": "tool_use", "id": "t", "name": "f", "input": {"x": Infinity}}]}, '
            '{"role": "user", "content": "hi"}]}')
    response = requests.post(f"{live()}/v1/messages", data=body, headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == 400, response.text


def test_images_are_checked_and_refused_when_they_are_not_what_they_claim(client):
    fake = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()  # a signature, no header
    for source, words in (({"type": "base64", "media_type": "image/tiff", "data": PNG}, "PNG, JPEG, GIF or WebP"),
                          ({"type": "base64", "media_type": "image/png", "data": "not base64!"}, "base64"),
                          ({"type": "url", "url": "file:///etc/passwd"}, "https"),
                          ({"type": "base64", "media_type": "image/png", "data": fake}, "not the PNG image")):
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="openai/gpt-4.1", max_tokens=10, messages=[
                {"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "?"}]}])
        assert words in refused.value.body["error"]["message"], refused.value.body


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_an_image_block_reaches_the_provider_in_its_own_format(provider, client, upstream):
    upstream.reset(Reply(chunks=BODIES[provider](["a ", "dot"])))
    model = "anthropic/claude-sonnet-4-5" if provider == "anthropic" else "openai/gpt-4.1"
    message = client.messages.create(model=model, max_tokens=10, messages=[{"role": "user", "content": [
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": PNG}},
                                         {"type": "text", "text": "what is it?"}]}])
    assert message.content[0].text == "a dot"
    sent = upstream.last().body["messages"][-1]["content"]
    if provider == "anthropic":
        assert sent == [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                        {"type": "text", "text": "what is it?"}]
    else:
        assert sent == [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                        {"type": "text", "text": "what is it?"}]


def test_relay_tokens_in_bearer_or_x_api_key(live, upstream):
    url = live(API_TOKENS="relay-token")
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=url, api_key="sk-ant-provider-key", max_retries=0).messages.create(
            model="openai/gpt-4.1", max_tokens=10, messages=HELLO)
    assert refused.value.body["error"]["type"] == "authentication_error"
    good = anthropic.Anthropic(base_url=url, api_key="relay-token", max_retries=0)
    assert good.messages.create(model="openai/gpt-4.1", max_tokens=10, messages=HELLO).content[0].text == "ok"
    assert upstream.last().headers["authorization"] == "Bearer test-key"  # the server's key, not the client's
    body = {"model": "openai/gpt-4.1", "max_tokens": 10, "messages": HELLO}
    keyed = requests.post(f"{url}/v1/messages", json=body, headers={"x-api-key": "relay-token"}, timeout=10)
    assert keyed.status_code == 200 and keyed.json()["content"][0]["text"] == "ok"
    wrong = requests.post(f"{url}/v1/messages", json=body, headers={"x-api-key": "nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    # Other routes keep their one way in.
    assert requests.post(f"{url}/api/chat", json={"prompt": "hi"}, headers={"x-api-key": "relay-token"},
                         timeout=10).status_code == 401


def test_an_idle_upstream_gets_ping_events_not_comments(live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["late"]), pauses={2: 2.5}))
    raw = requests.post(f"{live(SSE_HEARTBEAT_SECONDS=1)}/v1/messages", stream=True, timeout=10,
                        json={"model": "openai/m", "max_tokens": 10, "messages": HELLO, "stream": True}).text
    frames = frames_of(raw)
    pings = [data for name, data in frames if name == "ping"]
    assert pings and all(json.loads(p) == {"type": "ping"} for p in pings)
    assert all(name is not None for name, _ in frames) and "retry:" not in raw
    assert frames[0][0] == "message_start" and frames[-1][0] == "message_stop"


def test_a_failure_after_the_stream_started_is_an_error_event(live, upstream):
    # The provider is silent past the one heartbeat the response waits for, then refuses.
    upstream.reset(Reply(status=429, content_type="application/json", head_delay=2.5,
                         chunks=[b'{"error": {"message": "slow down"}}']))
    raw = requests.post(f"{live(SSE_HEARTBEAT_SECONDS=1, UPSTREAM_MAX_RETRIES=0)}/v1/messages", stream=True,
                        timeout=10, json={"model": "openai/m", "max_tokens": 10, "messages": HELLO, "stream": True})
    assert raw.status_code == 200
    frames = frames_of(raw.text)
    assert [name for name, _ in frames if name != "ping"] == ["message_start", "error"]
    assert "ping" in [name for name, _ in frames]
    assert json.loads(frames[-1][1]) == {"type": "error", "error": {
        "type": "rate_limit_error", "message": "the model provider is rate limiting this server; try again shortly"}}


def test_a_response_can_choose_its_keepalive_frame():
    from app.sse import HEARTBEAT, SseBody, StreamLog

    assert next(SseBody(StreamLog(), 0.01, retry=False)) == HEARTBEAT
    assert next(SseBody(StreamLog(), 0.01, retry=False, keepalive=AnthropicEvents.KEEPALIVE)) == (
        b'event: ping\ndata: {"type":"ping"}\n\n')


def test_the_sdk_reads_through_pings(live, upstream):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["slow ", "answer"]), pauses={3: 2.5}))
    client = anthropic.Anthropic(base_url=live(SSE_HEARTBEAT_SECONDS=1), api_key="x", max_retries=0)
    with client.messages.stream(model="anthropic/m", max_tokens=10, messages=HELLO) as stream:
        assert "".join(stream.text_stream) == "slow answer"


def test_leaving_mid_stream_closes_the_upstream(live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    client = anthropic.Anthropic(base_url=live(), api_key="x", max_retries=0)
    with client.messages.stream(model="openai/gpt-4.1", max_tokens=1000, messages=HELLO) as stream:
        for i, _ in enumerate(stream.text_stream):
            if i == 3:
                break
    assert upstream.wait_for_request().closed.wait(3), "the upstream kept generating"


def test_a_failing_provider_fails_over_behind_the_same_stream(live, upstream):
    upstream.reset(Reply(status=500, content_type="application/json", chunks=[b'{"error": {"message": "down"}}']),
                   Reply(chunks=BODIES["anthropic"](["from ", "the fallback"])))
    client = anthropic.Anthropic(base_url=live(LLM_FALLBACKS="anthropic/claude-fallback", UPSTREAM_MAX_RETRIES=0),
                                 api_key="x", max_retries=0)
    with client.messages.stream(model="openai/gpt-4.1", max_tokens=10, messages=HELLO) as stream:
        assert "".join(stream.text_stream) == "from the fallback"
    assert [seen.path for seen in upstream.seen] == ["/chat/completions", "/v1/messages"]
    assert upstream.last().body["model"] == "claude-fallback"


def test_nothing_is_stored_for_a_client_that_resends_its_history(upstream, make_app, serve):
    """The client keeps the conversation and gets no id to read or delete a record by: a
    record would only fill the disk (issue 20)."""
    app = make_app()
    url = serve(app)
    store = app.extensions["llm_sse_relay"].store
    upstream.reset(Reply(chunks=BODIES["openai"](["fine"])))
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    history = [*HELLO, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
    answer = client.messages.create(model="openai/gpt-4.1", max_tokens=10, messages=history)
    assert answer.content[0].text == "fine"
    assert store._conversations == {}


# ------------------------------------------------------------------ the wire, for deltas the relay adds later

def events_of(frames: list[bytes]) -> list[dict]:
    out = []
    for name, data in frames_of(b"".join(frames).decode()):
        event = json.loads(data)
        assert event["type"] == name
        out.append(event)
    return out


def test_reasoning_and_signed_thinking_become_thinking_blocks():
    wire = AnthropicEvents("anthropic/claude")
    frames = wire.opening("s1", "c1", "anthropic", "claude")
    frames += [wire.reasoning("Let me "), wire.reasoning("think."),
               wire.signed(Signed("anthropic", {"type": "thinking", "thinking": "Let me think.", "signature": "sig"})),
               wire.signed(Signed("anthropic", {"type": "redacted_thinking", "data": "opaque"})),
               wire.signed(Signed("gemini", {"thoughtSignature": "g"})),
               wire.text("Answer."), wire.tool_call(ToolCall("toolu_1", "f", '{"a": 1}'))]
    frames += wire.closing(Ending("tool_calls", {"input_tokens": 3, "output_tokens": 9}))
    events = events_of([f for f in frames if f])
    blocks: list[dict] = []
    for event in events:
        if event["type"] == "content_block_start":
            assert event["index"] == len(blocks)
            blocks.append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta":
            block, delta = blocks[event["index"]], event["delta"]
            key = {"thinking_delta": "thinking", "signature_delta": "signature", "text_delta": "text",
                   "input_json_delta": "json"}[delta["type"]]
            block[key] = block.get(key, "") + delta[{"json": "partial_json"}.get(key, key)]
    assert blocks[0] == {"type": "thinking", "thinking": "Let me think.", "signature": "sig"}
    assert blocks[1] == {"type": "redacted_thinking", "data": "opaque"}
    assert blocks[2] == {"type": "text", "text": "Answer."}
    assert blocks[3]["type"] == "tool_use" and json.loads(blocks[3]["json"]) == {"a": 1}
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["output_tokens"] == 9
    starts = sum(e["type"] == "content_block_start" for e in events)
    assert starts == sum(e["type"] == "content_block_stop" for e in events) == 4


def test_finish_reasons_map_to_stop_reasons():
    for finish, stop in (("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
                         ("stop_sequence", "stop_sequence"), ("stopped", "end_turn")):
        wire = AnthropicEvents("m")
        wire.opening("s", "c", "openai", "m")
        assert events_of(wire.closing(Ending(finish)))[0]["delta"]["stop_reason"] == stop


# ------------------------------------------------------------------ @anthropic-ai/sdk under Node

def test_the_anthropic_npm_package_streams_tools_aborts_and_errors(live, upstream):
    url = live(API_TOKENS="relay-token", SSE_HEARTBEAT_SECONDS=1)
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT))))
    streamed = run_node("anthropic_client.mjs", "stream", url)
    assert streamed["text"] == "".join(TRICKY_TEXT) and streamed["stop"] == "end_turn"
    assert streamed["output_tokens"] == len(TRICKY_TEXT)
    upstream.reset(Reply(chunks=BODIES["anthropic"](["from ", "claude"]), pauses={3: 2.5}))
    assert run_node("anthropic_client.mjs", "whole", url) == {"text": "from claude", "stop": "end_turn"}
    upstream.reset(Reply(chunks=openai_tool_call_body([("call_9", "get_weather", '{"city": "Lyon"}')])))
    tools = run_node("anthropic_client.mjs", "tools", url)
    assert tools == {"name": "get_weather", "input": {"city": "Lyon"}, "stop": "tool_use"}
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    aborted = run_node("anthropic_client.mjs", "abort", url)
    assert aborted["seen"] == 3, aborted
    assert upstream.wait_for_request().closed.wait(3), "the upstream kept generating after the abort"
    error = run_node("anthropic_client.mjs", "error", url)
    assert error["status"] == 400 and error["type"] == "invalid_request_error"


# ------------------------------------------------------------------ fuzzed like the other routes

blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "x"])
     | json_values},
    optional={"text": json_values, "source": json_values | st.fixed_dictionaries(
        {"type": st.sampled_from(["base64", "url"]), "media_type": st.sampled_from(["image/png"]) | json_values,
         "data": json_values, "url": json_values}), "id": json_values, "name": json_values, "input": json_values,
        "tool_use_id": json_values, "content": json_values, "is_error": json_values, "thinking": json_values,
        "signature": json_values, "data": json_values})
messages_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["openai/gpt-4.1", "demo/demo-fast", "anthropic/claude", "nope/x"]) | json_values,
     "max_tokens": st.sampled_from([1, 100, 5000]) | json_values,
     "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "assistant", "x"]), "content": json_values | st.lists(blocks, max_size=3)}),
         min_size=1, max_size=3))},
    optional={"stream": st.booleans() | json_values, "system": json_values, "tools": json_values,
              "tool_choice": json_values, "thinking": json_values | st.fixed_dictionaries(
                  {"type": st.sampled_from(["enabled", "adaptive", "disabled"])},
                  optional={"budget_tokens": json_values, "display": json_values}),
              "output_config": json_values, "stop_sequences": json_values, "temperature": json_values,
              "metadata": json_values, "cache_control": json_values, "bogus": json_values})
raw_messages_bodies = messages_bodies.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=100)
api_key_headers = headers | headers.map(lambda h: {**{k: v for k, v in h.items() if k != "Authorization"},
                                                   "x-api-key": "fuzz-token"})


@FUZZ
@given(body=raw_messages_bodies, hdrs=api_key_headers)
def test_fuzzed_messages_requests(server, fake_upstream, body, hdrs):  # noqa: F811
    fake_upstream.reset(Reply(chunks=BODIES["openai"](["o", "k"])))
    response = requests.post(f"{server}/v1/messages", data=body, headers=hdrs, timeout=20)
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        frames = frames_of(response.text)
        assert frames and frames[-1][0] in ("message_stop", "error"), response.text[-300:]
        assert all(json.loads(data)["type"] == name for name, data in frames)
        return
    check(response)
    if response.status_code >= 400:
        assert response.json()["type"] == "error"


# ------------------------------------------------------------------ against a Messages API no one here wrote

@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp's own server (tests/local_model.py, from the local model work), which speaks
    the Messages API itself: the reference the relay's shapes are compared with."""
    try:
        from tests.local_model import MODEL, LocalModel
    except ImportError:
        require(False, "tests/local_model.py (llama.cpp with Gemma 3 270M)")
    require(importlib.util.find_spec("xllamacpp") is not None, "xllamacpp (llama.cpp)")
    model_server = LocalModel()
    yield model_server.url, MODEL
    model_server.stop()


def shapes(client: anthropic.Anthropic, model: str) -> dict:
    """What the SDK reads from one streamed and one whole answer, less what differs by nature
    (ids, texts, counts)."""
    stream = client.messages.create(model=model, max_tokens=6, messages=[{"role": "user", "content": "What is 2+2?"}],
                                    stream=True, extra_body={"temperature": 0})
    events, text = [], ""
    for event in stream:
        if not events or events[-1] != event.type or event.type != "content_block_delta":
            events.append(event.type)
        if event.type == "content_block_delta":
            text += event.delta.text
        if event.type == "message_start":
            start = event.message
        if event.type == "message_delta":
            delta = event
    whole = client.messages.create(model=model, max_tokens=6, messages=[{"role": "user", "content": "What is 2+2?"}],
                                   extra_body={"temperature": 0})
    return {"events": events, "start": sorted(start.model_dump(exclude_none=True)) + [start.type, start.role],
            "stop_reason": (delta.delta.stop_reason, whole.stop_reason),
            "usage_counted": (delta.usage.output_tokens > 0, whole.usage.input_tokens > 0,
                              whole.usage.output_tokens > 0),
            "whole": sorted(whole.model_dump(exclude_none=True)) + [whole.type, whole.role],
            "blocks": [block.type for block in whole.content], "same_text": text == whole.content[0].text}


def test_the_same_client_code_reads_the_same_shapes_as_from_llama_cpp(llama_cpp, make_app, serve):
    url, model = llama_cpp
    # Retries: llama.cpp at times closes a kept-alive connection as the SDK's next request goes out.
    reference = shapes(anthropic.Anthropic(base_url=url, api_key="x", max_retries=2), model)
    relay = serve(make_app(OPENAI_COMPATIBLE_BASE_URL=f"{url}/v1", OPENAI_COMPATIBLE_API_KEY=""))
    ours = shapes(anthropic.Anthropic(base_url=relay, api_key="x", max_retries=0), f"openai-compatible/{model}")
    assert ours == reference
    assert reference["events"] == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                                   "message_delta", "message_stop"]
