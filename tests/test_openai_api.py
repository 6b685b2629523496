"""The OpenAI-compatible API, driven by the official `openai` Python package (sync and
async) against a live server whose upstream is the fake provider: the text and tool calls
the SDK assembles equal what the upstream sent, whatever provider is behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import openai
import pytest
import requests

from tests.conftest import run_node
from tests.fake_upstream import (
    BODIES,
    TRICKY_TEXT,
    Reply,
    anthropic_thinking_body,
    anthropic_tool_use_body,
    gemini_function_call_body,
    gemini_thinking_body,
    hostile_chunks,
    openai_reasoning_body,
    openai_tool_call_body,
    thinking_signature,
    thought_signature,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(live):
    # Any model name (ALLOWED_MODELS=*): these tests are about translation; the allow-list has its own.
    url = live(MODEL_ALIASES="smart=anthropic/claude-sonnet-4-5,fast=openai/gpt-4.1-mini", ALLOWED_MODELS="*")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="anything-when-auth-is-off", max_retries=0)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini", "mistral"])
def test_streamed_and_whole_answers_equal_the_upstream_text(provider, client, upstream):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    stream = client.chat.completions.create(model=f"{provider}/m", messages=HELLO, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(TRICKY_TEXT)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    whole = client.chat.completions.create(model=f"{provider}/m", messages=HELLO)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens > 0 and whole.model == f"{provider}/m"


def test_async_client_streams_too(live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["a", "b", "c"])))
    client = openai.AsyncOpenAI(base_url=f"{live()}/v1", api_key="x", max_retries=0)

    async def run() -> str:
        stream = await client.chat.completions.create(model="openai/gpt-4.1", messages=HELLO, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    # On a thread of its own: Playwright's sync API (browser tests) keeps a loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(asyncio.run, run()).result(timeout=30) == "abc"


def test_model_names_aliases_and_the_model_list(client, upstream):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["ok"])))
    assert client.chat.completions.create(model="smart", messages=HELLO).choices[0].message.content == "ok"
    assert upstream.last().path == "/v1/messages" and upstream.last().body["model"] == "claude-sonnet-4-5"
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    client.chat.completions.create(model="gpt-4.1", messages=HELLO)  # bare: the default provider (demo here)
    listed = [m.id for m in client.models.list()]
    assert "openai/gpt-4.1-mini" in listed and "smart" in listed and "fast" in listed


def test_request_options_reach_each_provider(client, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["x"])))
    client.chat.completions.create(model="openai/gpt-4.1", messages=[{"role": "developer", "content": "Be brief."},
                                                                      *HELLO],
                                   temperature=0.2, max_completion_tokens=50, stop=["END"], user="u1", seed=3)
    body = upstream.last().body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["temperature"] == 0.2 and body["max_completion_tokens"] == 50 and body["stop"] == ["END"]
    upstream.reset(Reply(chunks=BODIES["anthropic"](["x"])))
    client.chat.completions.create(model="anthropic/claude", messages=[{"role": "system", "content": "S"}, *HELLO],
                                   max_tokens=20, stop="END")
    body = upstream.last().body
    assert body["system"] == "S" and body["max_tokens"] == 20 and body["stop_sequences"] == ["END"]


@pytest.mark.parametrize("provider,reply", [
    ("openai", lambda: openai_tool_call_body([("call_1", "get_weather", '{"city": "Köln"}')])),
    ("anthropic", lambda: anthropic_tool_use_body("call_1", "get_weather", '{"city": "Köln"}', text="Checking. ")),
    ("gemini", lambda: gemini_function_call_body("get_weather", {"city": "Köln"})),
])
def test_client_tools_pass_through_in_openai_shape(provider, reply, client, upstream):
    upstream.reset(Reply(chunks=reply()))
    stream = client.chat.completions.create(model=f"{provider}/m", messages=HELLO, tools=[WEATHER], stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] = (call.function.name or entry["name"]) if call.function else entry["name"]
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Köln"}
    sent = upstream.last().body
    declared = json.dumps(sent.get("tools"))
    assert "get_weather" in declared and "city" in declared

    # The same call, not streamed; then the tool's result goes back in the provider's format.
    upstream.reset(Reply(chunks=reply()))
    whole = client.chat.completions.create(model=f"{provider}/m", messages=HELLO, tools=[WEATHER])
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    upstream.reset(Reply(chunks=BODIES[provider](["It is sunny."])))
    follow = [*HELLO, whole.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=f"{provider}/m", messages=follow, tools=[WEATHER])
    assert answer.choices[0].message.content == "It is sunny."
    sent = json.dumps(upstream.last().body)
    assert "sunny, 21 C" in sent and "get_weather" in sent
    if provider == "anthropic":
        blocks = upstream.last().body["messages"][-1]["content"]
        assert blocks[0]["type"] == "tool_result" and blocks[0]["tool_use_id"] == call.id
    if provider == "gemini":
        part = upstream.last().body["contents"][-1]["parts"][0]
        assert part["functionResponse"]["name"] == "get_weather"
    if provider == "openai":
        assert upstream.last().body["messages"][-1] == {"role": "tool", "tool_call_id": call.id,
                                                        "content": "sunny, 21 C"}


def test_tool_choice_is_translated(client, upstream):
    upstream.reset(Reply(chunks=anthropic_tool_use_body("c", "get_weather", '{"city": "x"}')))
    client.chat.completions.create(model="anthropic/m", messages=HELLO, tools=[WEATHER],
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert upstream.last().body["tool_choice"] == {"type": "tool", "name": "get_weather"}


def test_errors_have_openai_shape_and_status(client, upstream, live):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="openai/gpt-4.1", messages=[])
    assert bad.value.body["type"] == "invalid_request_error" and "messages" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="openai/gpt-4.1", messages=HELLO, n=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="openai/gpt-4.1", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}])  # images: test_images.py
    # An upstream failure before the stream: the provider's status, with our words (its own go to the log).
    upstream.reset(Reply(status=429, content_type="application/json",
                         chunks=[b'{"error": {"message": "Rate limit reached for requests"}}']))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="openai/gpt-4.1", messages=HELLO)
    assert "rate limiting" in limited.value.body["message"]
    assert "Rate limit reached" not in limited.value.body["message"]
    # During the stream: an error chunk, which the SDK raises.
    upstream.reset(Reply(chunks=BODIES["anthropic"](["partial ", "answer"], error_after=1)))
    stream = client.chat.completions.create(model="anthropic/m", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="reported an error during the answer"):
        for _ in stream:
            pass
    missing = openai.OpenAI(base_url=f"{live(OPENAI_API_KEY='')}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        missing.chat.completions.create(model="openai/gpt-4.1", messages=HELLO)


def test_relay_tokens_are_the_api_key(live, upstream):
    url = live(API_TOKENS="relay-token")
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-provider-key", max_retries=0).chat.completions.create(
            model="openai/gpt-4.1", messages=HELLO)
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="relay-token", max_retries=0)
    assert good.chat.completions.create(model="openai/gpt-4.1", messages=HELLO).choices[0].message.content == "ok"
    assert upstream.last().headers["authorization"] == "Bearer test-key"  # the server's key, not the client's


def test_leaving_mid_stream_closes_the_upstream_and_heartbeats_are_comments(live, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    client = openai.OpenAI(base_url=f"{live(SSE_HEARTBEAT_SECONDS=1)}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="openai/gpt-4.1", messages=HELLO, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert upstream.wait_for_request().closed.wait(3), "the upstream kept generating"
    upstream.reset(Reply(chunks=BODIES["openai"](["late"]), pauses={2: 2.5}))
    raw = requests.post(f"{live(SSE_HEARTBEAT_SECONDS=1)}/v1/chat/completions", stream=True, timeout=10,
                        json={"model": "openai/gpt-4.1", "messages": HELLO, "stream": True}).text
    assert ": ping" in raw and "retry:" not in raw and raw.rstrip().endswith("data: [DONE]")


def test_the_answer_is_recorded_once_per_turn_when_asked(live, upstream, make_app, serve):
    app = make_app()
    url = serve(app)
    store = app.extensions["llm_sse_relay"].store
    upstream.reset(Reply(chunks=BODIES["openai"](["fine"])))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    history = [*HELLO, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
    client.chat.completions.create(model="openai/gpt-4.1", messages=history)
    assert store._conversations == {}  # the client keeps the history; by default nothing is stored
    answer = client.chat.completions.create(model="openai/gpt-4.1", messages=history, store=True)
    conversation_id = None
    for key in getattr(store, "_conversations", {}):
        conversation_id = key
    records = store.messages(conversation_id)
    assert [r["role"] for r in records] == ["user", "assistant"]  # the new turn, not the resent history
    assert records[0]["content"] == "and now?" and records[1]["content"] == answer.choices[0].message.content


# ------------------------------------------------------------------ the openai npm package under Node

def test_the_openai_npm_package_streams_tools_aborts_and_errors(live, upstream):
    url = live(API_TOKENS="relay-token", ALLOWED_MODELS="*") + "/v1"
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT))))
    streamed = run_node("openai_client.mjs", "stream", url)
    assert streamed["text"] == "".join(TRICKY_TEXT) and streamed["finish"] == "stop"
    assert streamed["usage"]["completion_tokens"] == len(TRICKY_TEXT)
    upstream.reset(Reply(chunks=BODIES["anthropic"](["from ", "claude"])))
    assert run_node("openai_client.mjs", "whole", url) == {"text": "from claude", "finish": "stop"}
    upstream.reset(Reply(chunks=openai_tool_call_body([("call_9", "get_weather", '{"city": "Lyon"}')])))
    tools = run_node("openai_client.mjs", "tools", url)
    assert tools == {"name": "get_weather", "arguments": {"city": "Lyon"}, "finish": "tool_calls"}
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    aborted = run_node("openai_client.mjs", "abort", url)
    assert aborted["seen"] == 3, aborted  # nothing more after the abort
    assert upstream.wait_for_request().closed.wait(3), "the upstream kept generating after the abort"
    error = run_node("openai_client.mjs", "error", url)
    assert error["status"] == 400 and error["type"] == "invalid_request_error"


def test_the_demo_provider_calls_client_tools_offline(client):
    question = [{"role": "user", "content": "What does get_weather say for Paris"}]
    first = client.chat.completions.create(model="demo/demo-fast", messages=question, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "paris"}
    follow = [*question, first.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    answer = client.chat.completions.create(model="demo/demo-fast", messages=follow, tools=[WEATHER])
    assert answer.choices[0].message.content == "The tool `get_weather` says: **sunny**."


# ------------------------------------------------------------------ reasoning


def test_reasoning_effort_streams_reasoning_content_apart(client, upstream):
    upstream.reset(Reply(chunks=hostile_chunks(anthropic_thinking_body(["Six ", "sevens."], ["42."]))))
    chunks = list(client.chat.completions.create(model="anthropic/claude-sonnet-4-5", messages=HELLO, stream=True,
                                                 reasoning_effort="medium"))
    assert upstream.last().body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Six sevens."
    assert "".join(d.content or "" for d in deltas) == "42."
    upstream.reset(Reply(chunks=openai_reasoning_body(["Hm", "m."], ["Four."])))
    whole = client.chat.completions.create(model="openai/o4-mini", messages=HELLO, reasoning_effort="minimal")
    assert upstream.last().body["reasoning_effort"] == "low"
    assert whole.choices[0].message.content == "Four." and whole.choices[0].message.reasoning_content == "Hmm."
    assert whole.usage.completion_tokens_details.reasoning_tokens == 2
    upstream.reset(Reply(chunks=BODIES["openai"](["x"])))
    client.chat.completions.create(model="openai/gpt-4.1", messages=HELLO, reasoning_effort="none")
    assert "reasoning_effort" not in upstream.last().body
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="openai/gpt-4.1", messages=HELLO, reasoning_effort="maximum")


@pytest.mark.parametrize("provider,model,first", [
    ("anthropic", "claude-sonnet-4-5",
     lambda: anthropic_thinking_body(["Weather tool."], tool=("toolu_1", "get_weather", '{"city": "Köln"}'))),
    ("gemini", "gemini-3-flash-preview",
     lambda: gemini_thinking_body(["Weather tool."], call=("get_weather", {"city": "Köln"}))),
])
def test_client_tool_rounds_with_thinking_carry_their_signatures(provider, model, first, client, upstream):
    """A client that sends back the message it got (as the SDKs' examples do) sends back the
    thinking state with it: `thinking_blocks` (LiteLLM's field) and Gemini's own
    `extra_content.google.thought_signature`. The fake refuses the round otherwise."""
    upstream.reset(Reply(chunks=first()))
    whole = client.chat.completions.create(model=f"{provider}/{model}", messages=HELLO, tools=[WEATHER],
                                           reasoning_effort="low")
    message = whole.choices[0].message
    assert message.reasoning_content == "Weather tool." and message.tool_calls[0].function.name == "get_weather"
    if provider == "anthropic":
        assert message.thinking_blocks == [{"type": "thinking", "thinking": "Weather tool.",
                                            "signature": thinking_signature("Weather tool.")}]
    else:
        assert message.tool_calls[0].extra_content == {"google": {"thought_signature": thought_signature(
            "get_weather")}}
    upstream.reset(Reply(chunks=BODIES[provider](["It is sunny."])))
    follow = [*HELLO, message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}]
    answer = client.chat.completions.create(model=f"{provider}/{model}", messages=follow, tools=[WEATHER],
                                            reasoning_effort="low")
    assert answer.choices[0].message.content == "It is sunny."

    upstream.reset(Reply(chunks=first()))
    streamed = [c.choices[0].delta for c in client.chat.completions.create(
        model=f"{provider}/{model}", messages=HELLO, tools=[WEATHER], reasoning_effort="low", stream=True)
        if c.choices]
    if provider == "anthropic":
        assert [d.thinking_blocks for d in streamed if getattr(d, "thinking_blocks", None)] == [
            message.thinking_blocks]
    else:
        call = next(d.tool_calls[0] for d in streamed if d.tool_calls)
        assert call.extra_content == message.tool_calls[0].extra_content
