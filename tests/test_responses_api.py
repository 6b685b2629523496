"""`POST /v1/responses` (OpenAI's Responses API), driven by the official `openai` Python
package against a live server whose upstream is the fake provider: streamed and whole
answers, tools, stored responses, background answers resumed on another server sharing
Redis, cancel. Every event and object is also checked against the SDK's own types, strictly
(`pydantic` validation, where the SDK itself only constructs)."""

from __future__ import annotations

import base64
import json
import signal
from itertools import islice

import openai
import pydantic
import pytest
import requests
from openai.types.responses import Response, ResponseStreamEvent

from app.protocols import Ending, ResponseEvents
from app.providers.domain import ToolCall
from app.responses_api import EventsAfter
from app.sse import StreamLog
from tests.conftest import run_node, wait_until
from tests.fake_upstream import (
    BODIES,
    TRICKY_TEXT,
    Reply,
    anthropic_thinking_body,
    hostile_chunks,
    openai_tool_call_body,
    thinking_signature,
)

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SLOW = [f"w{i} " for i in range(60)]
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
                       "AAAABJRU5ErkJggg==")
# The fields a Response object must have (what the route fills in from the request).
TEMPLATE = {"id": "", "object": "response", "created_at": 1, "model": "m", "output": [], "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": []}


def events_of(text: str) -> list[dict]:
    """A Responses SSE body as its events, each checked: `event:` is its type, one `data:`
    line, valid as the SDK's ResponseStreamEvent; keepalives are comments."""
    events = []
    for frame in filter(str.strip, text.split("\n\n")):
        lines = frame.split("\n")
        if all(line.startswith(":") for line in lines):
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        assert set(fields) == {"event", "data"}, frame
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"]
        STREAM_EVENT.validate_python(data)
        events.append(data)
    return events


def numbered(events: list[dict], start: int = 0) -> None:
    assert [e["sequence_number"] for e in events] == list(range(start, start + len(events)))


def text_in(events) -> str:
    return "".join(e["delta"] if isinstance(e, dict) else e.delta for e in events
                   if (e["type"] if isinstance(e, dict) else e.type) == "response.output_text.delta")


@pytest.fixture
def client(live):
    # Any model name (ALLOWED_MODELS=*): these tests are about the wire; the allow-list has its own.
    url = live(MODEL_ALIASES="smart=anthropic/claude-sonnet-4-5", ALLOWED_MODELS="*")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="anything-when-auth-is-off", max_retries=0)


def post(client: openai.OpenAI, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{client.base_url}responses", json=body, timeout=20, **kwargs)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_streamed_and_whole_responses_equal_the_upstream_text(provider, client, upstream):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    raw = post(client, {"model": f"{provider}/m", "input": "hi", "stream": True})
    assert raw.headers["Content-Type"].startswith("text/event-stream") and "retry:" not in raw.text
    events = events_of(raw.text)
    numbered(events)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-5:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"][-5:] or kinds[-1] == "response.completed"
    assert text_in(events) == "".join(TRICKY_TEXT)
    completed = events[-1]["response"]
    Response.model_validate(completed)
    assert completed["status"] == "completed" and completed["usage"]["output_tokens"] > 0
    assert completed["output"][0]["content"][0]["text"] == "".join(TRICKY_TEXT)
    # The SDK's own stream helper assembles the same response.
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    with client.responses.stream(model=f"{provider}/m", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == "".join(TRICKY_TEXT) and final.id.startswith("resp_")
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[provider](TRICKY_TEXT))))
    whole = client.responses.create(model=f"{provider}/m", input="hi")
    assert whole.output_text == "".join(TRICKY_TEXT) and whole.status == "completed" and whole.model == f"{provider}/m"
    Response.model_validate(whole.model_dump())
    # Stored: retrieving it gives the same object.
    again = client.responses.retrieve(whole.id)
    assert again.output_text == whole.output_text and again.output[0].id == whole.output[0].id
    assert again.status == "completed" and again.usage.total_tokens == whole.usage.total_tokens


def test_request_options_reach_the_provider(client, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["x"])))
    client.responses.create(model="openai/gpt-4.1", instructions="Be brief.", temperature=0.5, max_output_tokens=99,
                            reasoning={"effort": "high", "summary": "auto"}, metadata={"k": "v"}, user="u1",
                            top_p=0.9, parallel_tool_calls=False, truncation="auto", store=True,
                            input=[{"role": "developer", "content": "Answer in French."},
                                   {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                                                {"type": "input_text", "text": " there"}]}])
    sent = upstream.last().body
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "system", "content": "Answer in French."},
                                {"role": "user", "content": "hi there"}]
    assert sent["temperature"] == 0.5 and sent["max_completion_tokens"] == 99 or sent.get("max_tokens") == 99
    upstream.reset(Reply(chunks=BODIES["anthropic"](["ok"])))
    answer = client.responses.create(model="smart", input="hi")  # an alias, as on /v1/chat/completions
    assert answer.output_text == "ok" and upstream.last().path == "/v1/messages"


def test_reasoning_summaries_and_the_signed_thinking_sent_back(client, upstream):
    reasoning = {"effort": "low", "summary": "auto"}
    upstream.reset(Reply(chunks=anthropic_thinking_body(["Let me ", "think."], ["Hi", "!"])))
    events = events_of(post(client, {"model": "anthropic/claude-sonnet-4-5", "input": "hi", "stream": True,
                                     "reasoning": reasoning}).text)
    numbered(events)
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta") == \
        "Let me think."
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    assert final["output"][1]["content"][0]["text"] == "Hi!" and upstream.last().body["thinking"]["type"] == "enabled"
    # Not streamed: the same items; continued: the signed thinking goes back to Anthropic with its turn.
    upstream.reset(Reply(chunks=anthropic_thinking_body(["Hmm."], ["Hello."])))
    whole = client.responses.create(model="anthropic/claude-sonnet-4-5", input="hi", reasoning=reasoning)
    assert whole.output[0].summary[0].text == "Hmm." and whole.output_text == "Hello."
    assert client.responses.retrieve(whole.id).output[0].summary[0].text == "Hmm."
    upstream.reset(Reply(chunks=anthropic_thinking_body(["Again."], ["Sure."])))
    client.responses.create(model="anthropic/claude-sonnet-4-5", input="more", previous_response_id=whole.id,
                            reasoning=reasoning)
    turn = upstream.last().body["messages"][1]
    assert turn["role"] == "assistant" and turn["content"][0] == {"type": "thinking", "thinking": "Hmm.",
                                                                  "signature": thinking_signature("Hmm.")}
    # A request that asks for no summary gets none (as OpenAI sends none).
    upstream.reset(Reply(chunks=anthropic_thinking_body(["Quiet."], ["Ok."])))
    quiet = client.responses.create(model="anthropic/claude-sonnet-4-5", input="hi", reasoning={"effort": "low"})
    assert [o.type for o in quiet.output] == ["message"]


def test_images_in_the_input_reach_the_provider(client, upstream):
    png = base64.b64encode(PNG).decode()
    upstream.reset(Reply(chunks=BODIES["openai"](["A dot."])))
    answer = client.responses.create(model="openai/gpt-4.1", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{png}", "detail": "auto"}]}])
    assert answer.output_text == "A dot."
    parts = upstream.last().body["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "What is this?"} and parts[1]["image_url"]["url"].endswith(png)
    for bad in ({"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                {"type": "input_image", "file_id": "file-1"}, {"type": "input_file", "file_id": "file-1"}):
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="openai/gpt-4.1", input=[{"role": "user", "content": [bad]}])


def test_function_tools_round_trip_with_previous_response_id(client, upstream):
    upstream.reset(Reply(chunks=openai_tool_call_body([("call_1", "get_weather", '{"city": "Paris"}')])))
    first = client.responses.create(model="openai/gpt-4.1", input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice="auto")
    Response.model_validate(first.model_dump())
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {
        "city": "Paris"}
    assert upstream.last().body["tools"][0]["function"]["name"] == "get_weather"
    upstream.reset(Reply(chunks=BODIES["openai"](["It is sunny."])))
    second = client.responses.create(model="openai/gpt-4.1", previous_response_id=first.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": '{"sky": "clear"}'}])
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    sent = upstream.last().body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2] == {"role": "tool", "tool_call_id": "call_1",
                                                                      "content": '{"sky": "clear"}'}
    # Stateless, as clients that resend every item do: the same exchange as items.
    upstream.reset(Reply(chunks=BODIES["openai"](["Sunny."])))
    stateless = client.responses.create(model="openai/gpt-4.1", store=False, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "clear"}])
    assert stateless.output_text == "Sunny." and [m["role"] for m in upstream.last().body["messages"]] == [
        "user", "assistant", "tool"]
    # A stored:false response is nobody's to find or continue.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stateless.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="openai/gpt-4.1", previous_response_id=stateless.id, input="and?")


def test_item_references_name_output_items_of_the_callers_stored_responses(client, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["Hi there."])))
    first = client.responses.create(model="openai/m", input="hi")
    upstream.reset(Reply(chunks=BODIES["openai"](["Fine."])))
    client.responses.create(model="openai/m", input=[{"role": "user", "content": "hi"},
                                                     {"type": "item_reference", "id": first.output[0].id},
                                                     {"role": "user", "content": "how are you?"}])
    assert [(m["role"], m["content"]) for m in upstream.last().body["messages"]] == [
        ("user", "hi"), ("assistant", "Hi there."), ("user", "how are you?")]
    for unknown in ("msg_nope_0", first.output[0].id[:-1] + "7", "resp_x", 42):
        with pytest.raises(openai.BadRequestError, match="item_reference"):
            client.responses.create(model="openai/m", input=[{"type": "item_reference", "id": unknown},
                                                             {"role": "user", "content": "?"}])


def test_streamed_tool_calls_are_function_call_items(client, upstream):
    upstream.reset(Reply(chunks=openai_tool_call_body([("call_1", "get_weather", '{"city": "Oslo"}'),
                                                       ("call_2", "get_weather", '{"city": "Rome"}')])))
    with client.responses.stream(model="openai/gpt-4.1", input="weather?", tools=[WEATHER]) as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert [(o.call_id, json.loads(o.arguments)["city"]) for o in final.output] == [("call_1", "Oslo"),
                                                                                   ("call_2", "Rome")]
    assert seen.count("response.function_call_arguments.done") == 2 and seen[-1] == "response.completed"


def test_failures_lengths_and_bad_requests(client, upstream):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["partial ", "answer"], error_after=1)))
    events = events_of(post(client, {"model": "anthropic/m", "input": "hi", "stream": True}).text)
    numbered(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "anthropic" in failed["error"]["message"] and "Overloaded" not in failed["error"]["message"]  # ours
    assert failed["output"][0]["content"][0]["text"] == "partial " and failed["output"][0]["status"] == "incomplete"
    upstream.reset(Reply(chunks=BODIES["openai"](["cut"], finish="length")))
    events = events_of(post(client, {"model": "openai/m", "input": "hi", "stream": True}).text)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    # Unknown fields and bad values: 400 in OpenAI's error shape, which the SDK raises.
    for bad in ({"conversation": "c"}, {"input": []}, {"input": [{"type": "item_reference", "id": "x"}]},
                {"tools": [{"type": "web_search"}]}, {"background": True, "store": False},
                {"reasoning": {"effort": "max"}}, {"text": {"format": {"type": "json_object"}}},
                {"input": [{"role": "assistant", "content": "last word"}]}, {"temperature": 3}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**{"model": "openai/m", "input": "hi", **bad})
        assert refused.value.body["type"] == "invalid_request_error", bad
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="bad model\n", input="hi")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_doesNotExist")
    upstream.reset(Reply(status=429, content_type="application/json",
                         chunks=[b'{"error": {"message": "Rate limit reached"}}']))
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="openai/gpt-4.1", input="hi")


def test_leaving_a_direct_stream_closes_the_upstream_and_keepalives_are_comments(live, upstream):
    url = live(SSE_HEARTBEAT_SECONDS=1, ALLOWED_MODELS="*")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    stream = client.responses.create(model="openai/gpt-4.1", input="hi", stream=True)
    assert len(list(islice(stream, 6))) == 6
    stream.close()
    assert upstream.wait_for_request().closed.wait(3), "the upstream kept generating"
    upstream.reset(Reply(chunks=BODIES["openai"](["late"]), pauses={2: 2.5}))
    raw = requests.post(f"{url}/v1/responses", json={"model": "openai/m", "input": "hi", "stream": True},
                        timeout=10).text
    assert ": ping" in raw and events_of(raw)[-1]["type"] == "response.completed"
    upstream.reset(Reply(chunks=BODIES["openai"](["late"]), pauses={2: 2.5}))
    with client.responses.stream(model="openai/m", input="hi") as stream:  # the SDK reads past the comments
        assert stream.get_final_response().output_text == "late"


def test_another_callers_response_is_not_found(live, upstream):
    url = live(API_TOKENS="alpha,beta", ALLOWED_MODELS="*") + "/v1"
    alpha = openai.OpenAI(base_url=url, api_key="alpha", max_retries=0)
    beta = openai.OpenAI(base_url=url, api_key="beta", max_retries=0)
    upstream.reset(Reply(chunks=BODIES["openai"](["mine"])))
    mine = alpha.responses.create(model="openai/m", input="hi")
    assert alpha.responses.retrieve(mine.id).output_text == "mine"
    with pytest.raises(openai.NotFoundError):
        beta.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.cancel(mine.id)
    with pytest.raises(openai.NotFoundError):
        beta.responses.create(model="openai/m", previous_response_id=mine.id, input="and?")
    with pytest.raises(openai.BadRequestError):  # nor are its items
        beta.responses.create(model="openai/m", input=[{"type": "item_reference", "id": mine.output[0].id},
                                                       {"role": "user", "content": "and?"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-other", max_retries=0).responses.retrieve(mine.id)


def test_background_response_runs_without_a_reader_and_is_retrieved_whole(client, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](SLOW), delay=0.01))
    created = client.responses.create(model="openai/m", input="hi", background=True)
    assert created.status == "queued" and created.background is True and created.output == []
    Response.model_validate(created.model_dump())
    wait_until(lambda: client.responses.retrieve(created.id).status == "completed", timeout=20,
               what="the background response to complete")
    done = client.responses.retrieve(created.id)
    assert done.output_text == "".join(SLOW) and done.usage.output_tokens > 0
    Response.model_validate(done.model_dump())
    # Its events, replayed from the start; the SDK's resume helper filters on its side.
    replay = list(client.responses.retrieve(created.id, stream=True))
    assert text_in(replay) == "".join(SLOW) and [e.sequence_number for e in replay] == list(range(len(replay)))
    with client.responses.stream(response_id=created.id, starting_after=10) as stream:
        assert stream.get_final_response().output_text == "".join(SLOW)
    # Finished: cancelling changes nothing; and a non-background response cannot be cancelled or replayed.
    assert client.responses.cancel(created.id).status == "completed"
    upstream.reset(Reply(chunks=BODIES["openai"](["x"])))
    plain = client.responses.create(model="openai/m", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.retrieve(plain.id, stream=True)
    # Deleted: gone for good (a record nobody could delete would be a free way to fill the disk).
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_cancel_stops_a_background_response(client, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(400)]), delay=0.05))
    created = client.responses.create(model="openai/m", input="hi", background=True)
    seen = upstream.wait_for_request()
    with pytest.raises(openai.BadRequestError, match="not ended"):  # nothing to continue from yet
        client.responses.create(model="openai/m", input="and?", previous_response_id=created.id)
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert seen.closed.wait(5), "the upstream kept generating after cancel"
    wait_until(lambda: client.responses.retrieve(created.id).status == "cancelled", timeout=10,
               what="the cancelled response's record")
    ending = list(client.responses.retrieve(created.id, stream=True))[-1]
    assert ending.type == "response.incomplete" and ending.response.status == "cancelled"


@pytest.mark.redis
def test_background_stream_resumes_on_another_server_from_the_stream_log(redis_server, upstream, make_app, serve):
    redis_server.flush()
    one, two = (openai.OpenAI(base_url=serve(make_app(STORE_URL=redis_server.url, ALLOWED_MODELS="*")) + "/v1",
                              api_key="x", max_retries=0) for _ in range(2))
    upstream.reset(Reply(chunks=BODIES["openai"](SLOW), delay=0.03))
    stream = one.responses.create(model="openai/m", input="hi", background=True, stream=True)
    got = list(islice(stream, 12))
    stream.close()  # the client leaves; the answer goes on
    response_id = got[0].response.id
    rest = list(two.responses.retrieve(response_id, stream=True, starting_after=got[-1].sequence_number))
    events = got + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))  # nothing lost, nothing twice
    assert text_in(events) == "".join(SLOW) and events[-1].type == "response.completed"
    assert len(upstream.seen) == 1  # one upstream call
    # Without starting_after: the whole stream again, numbered alike; the object is complete anywhere.
    replay = list(two.responses.retrieve(response_id, stream=True))
    assert [(e.sequence_number, e.type) for e in replay] == [(e.sequence_number, e.type) for e in events]
    assert one.responses.retrieve(response_id).output_text == two.responses.retrieve(response_id).output_text
    # Cancel from the other server stops the producer here.
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(400)]), delay=0.05))
    running = one.responses.create(model="openai/m", input="hi", background=True)
    seen = upstream.wait_for_request()
    assert two.responses.cancel(running.id).status == "cancelled"
    assert seen.closed.wait(5), "the producer did not stop"
    wait_until(lambda: one.responses.retrieve(running.id).status == "cancelled", timeout=10, what="the record")


def test_the_wire_writes_reasoning_summaries_and_numbers_every_event():
    wire = ResponseEvents(TEMPLATE, summaries=True)
    frames = wire.opening("s", "c1", "openai", "m")
    frames += [wire.reasoning("Thinking"), wire.reasoning(" hard."), wire.text("Hel"), wire.text("lo"),
               wire.tool_call(ToolCall("call_9", "get_weather", '{"city":"Oslo"}'))]
    frames += wire.closing(Ending("tool_calls", {"input_tokens": 3, "output_tokens": 9, "reasoning_tokens": 4}))
    events = events_of(b"".join(frames).decode())
    numbered(events)
    kinds = [e["type"] for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.reasoning_summary_part.added",
                          "response.reasoning_summary_text.delta"]
    assert "response.reasoning_summary_text.done" in kinds and "response.reasoning_summary_part.done" in kinds
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][0]["summary"] == [{"type": "summary_text", "text": "Thinking hard."}]
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 4 and final["id"] == "resp_c1"
    quiet = ResponseEvents(TEMPLATE, summaries=False)
    assert quiet.reasoning("hidden") is None  # a request that asked for no summary gets none


def test_starting_after_cuts_a_frame_of_several_events():
    wire = ResponseEvents(TEMPLATE)
    log = StreamLog()
    for frame in wire.opening("s", "c", "p", "m") + [wire.text("a"), wire.text("b")] + wire.closing(Ending()):
        log.append(frame)
    log.close()
    everything = events_of(b"".join(log.frames).decode())
    for after in range(len(everything)):
        view, position, got = EventsAfter(log, after), 0, []
        while frames := view.wait(position, 0.01):
            position += len(frames)
            got += events_of(b"".join(frames).decode())
        assert got == everything[after + 1:], after


def test_node_clients_the_openai_package_and_the_ai_sdk(live, upstream):
    url = live(ALLOWED_MODELS="*")
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT))))
    streamed = run_node("openai_client.mjs", "responses-stream", url + "/v1")
    assert streamed["text"] == "".join(TRICKY_TEXT) and streamed["status"] == "completed"
    assert streamed["sequence"] == list(range(streamed["events"]))
    upstream.reset(Reply(chunks=BODIES["anthropic"](["whole ", "answer"])))
    assert run_node("openai_client.mjs", "responses-whole", url + "/v1") == {"text": "whole answer",
                                                                             "status": "completed"}
    upstream.reset(Reply(chunks=openai_tool_call_body([("call_1", "get_weather", '{"city": "Paris"}')])))
    assert run_node("openai_client.mjs", "responses-tools", url + "/v1") == {
        "name": "get_weather", "arguments": {"city": "Paris"}, "type": "function_call"}
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["gemini"](TRICKY_TEXT))))
    result = run_node("ai_client.mjs", "responses", url + "/v1")
    assert result["text"] == "".join(TRICKY_TEXT) and result["finishReason"] == "stop"
    assert result["usage"]["outputTokens"] > 0 and "Generate" in upstream.last().path
    upstream.reset(Reply(chunks=BODIES["openai"](["Hello."])), Reply(chunks=BODIES["openai"](["More."])))
    assert run_node("ai_client.mjs", "responses-turns", url + "/v1") == {"first": "Hello.", "second": "More."}
    assert upstream.last().body["messages"] == [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "Hello."},
                                                {"role": "user", "content": "and then?"}]


@pytest.fixture
def two_gunicorns(redis_server, fake_upstream):
    """Two gunicorn processes (the production worker class) sharing one Redis."""
    from tests.conftest import free_port, provider_env
    from tests.servers import gunicorn

    redis_server.flush()
    env = {**provider_env(fake_upstream.url), "STORE_URL": redis_server.url, "ALLOWED_MODELS": "*",
           "SSE_HEARTBEAT_SECONDS": "0.5"}
    servers = [gunicorn(free_port(), env), gunicorn(free_port(), env)]
    yield servers
    for server in servers:
        server.stop()


@pytest.mark.redis
def test_background_response_across_gunicorn_processes(two_gunicorns, upstream):
    producer = two_gunicorns[0]
    one, two = (openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0) for s in two_gunicorns)
    upstream.reset(Reply(chunks=BODIES["openai"](SLOW), delay=0.03))
    stream = one.responses.create(model="openai/m", input="hi", background=True, stream=True)
    got = list(islice(stream, 9))
    stream.close()
    rest = list(two.responses.retrieve(got[0].response.id, stream=True, starting_after=got[-1].sequence_number))
    events = got + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert text_in(events) == "".join(SLOW) and len(upstream.seen) == 1
    # Its producer's process dies: the object says so on the other one, not in_progress forever.
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(400)]), delay=0.05))
    doomed = one.responses.create(model="openai/m", input="hi", background=True)
    upstream.wait_for_request()
    assert two.responses.retrieve(doomed.id).status == "in_progress"
    producer.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: two.responses.retrieve(doomed.id).status == "failed", timeout=20,
               what="the lost response to be reported failed")
