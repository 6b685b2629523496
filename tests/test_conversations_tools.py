"""Conversation memory and server-side tool calling, against the fake upstream."""

import json
import threading

import pytest
import requests

from app.tools import schema_from_signature, toolbox
from tests.conftest import close_ws, open_stream, text_of
from tests.fake_upstream import (
    BODIES,
    Reply,
    anthropic_thinking_body,
    anthropic_tool_use_body,
    gemini_thinking_body,
    openai_reasoning_body,
    openai_tool_call_body,
    thinking_signature,
    thought_signature,
)


def conversation(url, conversation_id):
    return requests.get(f"{url}/api/conversations/{conversation_id}", timeout=10).json()["messages"]


def test_history_is_replayed_and_stream_and_rest_store_identical_records(upstream, live):
    url = live()
    upstream.reset(Reply(chunks=BODIES["openai"](["first ", "answer"])))
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=one").read_all()
    conversation_id = events[0].data["conversation_id"]
    upstream.reset(Reply(chunks=BODIES["openai"](["second ", "answer"])))
    rest = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "two",
                                                  "conversation_id": conversation_id}, timeout=10).json()
    assert rest["conversation_id"] == conversation_id and rest["content"] == "second answer"
    sent = upstream.last().body["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", "one"), ("assistant", "first answer"), ("user", "two")]
    records = conversation(url, conversation_id)
    assert [(r["role"], r["content"]) for r in records] == [
        ("user", "one"), ("assistant", "first answer"), ("user", "two"), ("assistant", "second answer")]
    streamed, restful = records[1], records[3]
    assert set(streamed) == set(restful)  # the same record, whichever route answered
    assert streamed["status"] == restful["status"] == "done"
    assert streamed["usage"] == {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7} == restful["usage"]
    assert records[0]["request_id"] == records[1]["request_id"] == events[0].data["id"]


def test_post_sse_stores_the_user_message_when_accepted(upstream, live):
    url = live()
    ticket = requests.post(f"{url}/api/chat/streams", json={"prompt": "hello there"}, timeout=10).json()
    records = conversation(url, ticket["conversation_id"])
    assert [(r["role"], r["content"]) for r in records] == [("user", "hello there")]
    upstream.reset(Reply(chunks=BODIES["openai"](["hi"])))
    open_stream(url + ticket["stream_url"]).read_all()
    assert [r["role"] for r in conversation(url, ticket["conversation_id"])] == ["user", "assistant"]


def test_failed_and_abandoned_answers_are_stored_and_marked(upstream, live):
    url = live()
    upstream.reset(Reply(chunks=BODIES["openai"](["part ", "of it", "never"], error_after=2)))
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=q").read_all()
    conversation_id = events[0].data["conversation_id"]
    failed = conversation(url, conversation_id)[-1]
    assert failed["status"] == "error" and failed["content"] == "part of it"
    assert failed["error"]["type"] == "upstream_error"

    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(300)]), delay=0.02))
    reader = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=q2&conversation_id={conversation_id}")
    reader.until("token")
    reader.close()
    assert upstream.last().closed.wait(3)
    for _ in range(50):
        records = conversation(url, conversation_id)
        if len(records) == 4:
            break
        threading.Event().wait(0.05)
    assert records[-1]["status"] == "abandoned" and records[-1]["finish_reason"] == "stopped"


def test_history_budget_bounds_what_is_sent(upstream, live):
    url = live(HISTORY_MAX_MESSAGES=3)
    conversation_id = None
    for n in range(4):
        upstream.reset(Reply(chunks=BODIES["openai"]([f"a{n}"])))
        body = {"provider": "openai", "prompt": f"q{n}"}
        if conversation_id:
            body["conversation_id"] = conversation_id
        conversation_id = requests.post(f"{url}/api/chat", json=body, timeout=10).json()["conversation_id"]
    sent = upstream.last().body["messages"]
    assert [m["content"] for m in sent] == ["q2", "a2", "q3"]
    assert len(conversation(url, conversation_id)) == 8  # storage keeps everything


def test_concurrent_writers_do_not_corrupt_a_conversation(live, tmp_path):
    url = live(STORE_URL=f"sqlite:///{tmp_path}/c.sqlite3", MAX_STREAMS_PER_CLIENT=0)  # 12 at once from one client
    first = requests.post(f"{url}/api/chat", json={"prompt": "start", "model": "demo-fast"}, timeout=10).json()
    conversation_id = first["conversation_id"]
    errors = []

    def ask(n):
        try:
            r = requests.post(f"{url}/api/chat", json={"prompt": f"q{n}", "model": "demo-fast",
                                                       "conversation_id": conversation_id}, timeout=30)
            assert r.status_code == 200
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    records = conversation(url, conversation_id)
    assert len(records) == 2 + 12 * 2
    by_request = {}
    for record in records:
        by_request.setdefault(record["request_id"], []).append(record["role"])
    assert all(roles == ["user", "assistant"] for roles in by_request.values())


def test_delete_conversation(live):
    url = live()
    conversation_id = requests.post(f"{url}/api/chat", json={"prompt": "x", "model": "demo-fast"},
                                    timeout=10).json()["conversation_id"]
    assert requests.delete(f"{url}/api/conversations/{conversation_id}", timeout=10).json()["deleted"] is True
    assert requests.get(f"{url}/api/conversations/{conversation_id}", timeout=10).status_code == 404
    assert requests.delete(f"{url}/api/conversations/{conversation_id}", timeout=10).status_code == 404


# ------------------------------------------------------------------ tools


def tool_events(events):
    return [e.data["tool"] for e in events if e.event == "meta" and "tool" in e.data]


def test_openai_multi_round_tools(upstream, live):
    upstream.reset(
        Reply(chunks=openai_tool_call_body([("call_a", "calculate", '{"expression": "2+3"}')])),
        Reply(chunks=openai_tool_call_body([("call_b", "current_time", '{"timezone": "Europe/Berlin"}')])),
        Reply(chunks=BODIES["openai"](["It is ", "5."])),
    )
    url = live()
    events = open_stream(f"{url}/api/chat/stream", json_body={"provider": "openai", "prompt": "2+3?",
                                                               "tools": True}).read_all()
    assert text_of(events) == "It is 5." and events[-1].event == "done"
    tools = tool_events(events)
    assert [(t["name"], t["status"]) for t in tools] == [
        ("calculate", "running"), ("calculate", "done"), ("current_time", "running"), ("current_time", "done")]
    assert tools[1]["result_preview"] == "5"
    first, second, third = upstream.seen
    assert {t["function"]["name"] for t in first.body["tools"]} >= {"calculate", "current_time"}
    assert second.body["messages"][-2]["tool_calls"][0]["function"] == {"name": "calculate",
                                                                       "arguments": '{"expression": "2+3"}'}
    assert second.body["messages"][-1] == {"role": "tool", "tool_call_id": "call_a", "content": "5"}
    assert third.body["messages"][-1]["tool_call_id"] == "call_b"
    record = conversation(url, events[0].data["conversation_id"])[-1]
    assert [t["name"] for t in record["tools"]] == ["calculate", "current_time"]


def test_anthropic_tool_format(upstream, live):
    upstream.reset(
        Reply(chunks=anthropic_tool_use_body("toolu_1", "calculate", '{"expression": "6*7"}', text="Let me see. ")),
        Reply(chunks=BODIES["anthropic"](["42."])),
    )
    events = open_stream(f"{live()}/api/chat/stream", json_body={"provider": "anthropic", "prompt": "6*7?",
                                                                  "tools": ["calculate"]}).read_all()
    assert text_of(events) == "Let me see. 42."
    first, second = upstream.seen
    assert [t["name"] for t in first.body["tools"]] == ["calculate"] and "input_schema" in first.body["tools"][0]
    assistant, user = second.body["messages"][-2:]
    assert assistant["content"][1] == {"type": "tool_use", "id": "toolu_1", "name": "calculate",
                                       "input": {"expression": "6*7"}}
    assert user["content"] == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42", "is_error": False}]


@pytest.fixture
def broken_tool():
    @toolbox.register
    def explode(reason: str) -> str:
        """Always fails."""
        raise RuntimeError(f"boom: {reason}")

    yield "explode"
    toolbox.tools.pop("explode")


def test_failing_tool_and_bad_arguments_are_told_to_the_model(broken_tool, upstream, live):
    upstream.reset(
        Reply(chunks=openai_tool_call_body([("c1", "explode", '{"reason": "test"}'), ("c2", "calculate", '{"expr')])),
        Reply(chunks=BODIES["openai"](["Sorry."])),
    )
    events = open_stream(f"{live()}/api/chat/stream", json_body={"provider": "openai", "prompt": "x",
                                                                  "tools": True}).read_all()
    assert text_of(events) == "Sorry." and events[-1].event == "done"
    done = [t for t in tool_events(events) if t["status"] != "running"]
    assert [(t["name"], t["status"]) for t in done] == [("explode", "error"), ("calculate", "error")]
    results = [m for m in upstream.last().body["messages"] if m["role"] == "tool"]
    assert results[0]["content"] == "error: RuntimeError: boom: test"
    assert results[1]["content"].startswith("error: the arguments are not valid JSON")


def test_round_limit_forces_an_answer_without_tools(upstream, live):
    asks_again = Reply(chunks=openai_tool_call_body([("c", "calculate", '{"expression": "1+1"}')]))
    upstream.reset(asks_again, asks_again, Reply(chunks=BODIES["openai"](["Done."])))
    events = open_stream(f"{live(TOOL_MAX_ROUNDS=2)}/api/chat/stream",
                         json_body={"provider": "openai", "prompt": "loop", "tools": True}).read_all()
    assert text_of(events) == "Done."
    assert {"status": "round_limit", "rounds": 2} in tool_events(events)
    assert len(upstream.seen) == 3 and "tools" not in upstream.last().body


def test_rest_route_runs_tools_too(upstream, live):
    upstream.reset(Reply(chunks=openai_tool_call_body([("c", "calculate", '{"expression": "10/4"}')])),
                   Reply(chunks=BODIES["openai"](["2.5"])))
    body = requests.post(f"{live()}/api/chat", json={"provider": "openai", "prompt": "10/4", "tools": True},
                         timeout=10).json()
    assert body["content"] == "2.5" and body["tools"][0]["result"] == "2.5"


def test_demo_provider_uses_the_builtin_tools_offline(live):
    events = open_stream(f"{live()}/api/chat/stream", json_body={"prompt": "what is 6 * 7 ?", "tools": True,
                                                                  "model": "demo-fast"}).read_all()
    assert ("calculate", "done") in [(t["name"], t["status"]) for t in tool_events(events)]
    assert "42" in text_of(events)


def test_unknown_tool_is_a_400(client):
    response = client.post("/api/chat/stream", json={"prompt": "x", "tools": ["rm_rf"]})
    assert response.status_code == 400 and "rm_rf" in response.get_json()["error"]["message"]
    assert client.post("/api/chat", json={"prompt": "x", "tools": 5}).status_code == 400


def test_schema_from_type_hints_and_safe_calculator():
    def lookup(city: str, days: int = 3, metric: bool = True) -> dict:
        return {}

    assert schema_from_signature(lookup) == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "default": 3},
        "metric": {"type": "boolean", "default": True}}}
    calculate = toolbox.tools["calculate"].function
    assert calculate("(1 + 2) * 3 ** 2") == 27
    for hostile in ("__import__('os')", "9 ** 9 ** 9", "[1] * 10", "a + 1"):
        with pytest.raises(ValueError):
            calculate(hostile)
    assert json.loads(json.dumps(toolbox.tools["current_time"].schema()))["name"] == "current_time"


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_later_turns_replay_the_tool_exchange_in_the_providers_format(provider, upstream, live):
    """Not only the answer's text: the calls and what the tools returned, so the model can build on them."""
    first_round = (openai_tool_call_body([("call_a", "calculate", '{"expression": "6*7"}')]) if provider == "openai"
                   else anthropic_tool_use_body("call_a", "calculate", '{"expression": "6*7"}', text="Let me see. "))
    upstream.reset(Reply(chunks=first_round), Reply(chunks=BODIES[provider](["It is 42."])))
    url = live()
    first = open_stream(f"{url}/api/chat/stream", json_body={"provider": provider, "prompt": "6*7?",
                                                              "tools": True}).read_all()
    conversation_id = first[0].data["conversation_id"]
    upstream.reset(Reply(chunks=BODIES[provider](["Yes."])))
    open_stream(f"{url}/api/chat/stream", json_body={"provider": provider, "prompt": "Sure?",
                                                      "conversation_id": conversation_id}).read_all()
    sent = upstream.last().body["messages"]
    if provider == "openai":
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
        assert sent[1]["tool_calls"][0]["function"] == {"name": "calculate", "arguments": '{"expression": "6*7"}'}
        assert sent[2] == {"role": "tool", "tool_call_id": "call_a", "content": "42"}
        assert sent[3]["content"] == "It is 42."
    else:
        assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
        assert sent[1]["content"][0] == {"type": "text", "text": "Let me see. "}
        assert sent[1]["content"][1]["type"] == "tool_use" and sent[1]["content"][1]["input"] == {"expression": "6*7"}
        assert sent[2]["content"][0]["type"] == "tool_result" and sent[2]["content"][0]["content"] == "42"
        assert sent[3]["content"] == "It is 42."


# ------------------------------------------------------------------ tool rounds with thinking


def thinking_rounds(provider):
    """The fake's two rounds of a thinking model that calls `calculate`, then answers."""
    if provider == "anthropic":
        return (Reply(chunks=anthropic_thinking_body(["I should ", "calculate."],
                                                     tool=("toolu_1", "calculate", '{"expression": "6*7"}'))),
                Reply(chunks=anthropic_thinking_body(["It returned 42."], ["It is ", "42."])))
    return (Reply(chunks=gemini_thinking_body(["I should ", "calculate."], call=("calculate", {"expression": "6*7"}))),
            Reply(chunks=gemini_thinking_body(["It returned 42."], ["It is ", "42."])))


THINKING_MODELS = {"anthropic": "claude-sonnet-4-5", "gemini": "gemini-3-flash-preview"}


@pytest.mark.parametrize("provider", ["anthropic", "gemini"])
def test_tool_rounds_with_thinking_send_the_signatures_back(provider, upstream, live):
    """Both APIs refuse the second round unless the first round's thinking state comes back
    unchanged (the fake refuses it as they do); the reasoning streams as its own events."""
    upstream.reset(*thinking_rounds(provider))
    url = live()
    events = open_stream(f"{url}/api/chat/stream", json_body={
        "provider": provider, "model": THINKING_MODELS[provider], "prompt": "6*7?", "tools": True,
        "reasoning": "low", "temperature": 0.5}).read_all()
    assert events[-1].event == "done", events[-1].data
    assert text_of(events) == "It is 42."
    assert "".join(e.data["text"] for e in events if e.event == "reasoning") == "I should calculate.It returned 42."
    names = [e.event for e in events]
    assert names.index("reasoning") < names.index("token")
    first, second = upstream.seen
    if provider == "anthropic":
        assert first.body["thinking"] == {"type": "enabled", "budget_tokens": 1024} and "temperature" not in first.body
        turn = second.body["messages"][1]["content"]
        assert [b["type"] for b in turn] == ["thinking", "tool_use"]
        assert turn[0]["thinking"] == "I should calculate." and turn[0]["signature"] == thinking_signature(
            "I should calculate.")
    else:
        assert first.body["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingLevel": "low"}
        call = second.body["contents"][1]["parts"][0]
        assert call == {"functionCall": {"name": "calculate", "args": {"expression": "6*7"}},
                        "thoughtSignature": thought_signature("calculate")}
    record = conversation(url, events[0].data["conversation_id"])[-1]
    assert record["content"] == "It is 42." and record["reasoning"] == "I should calculate.It returned 42."
    assert record["usage"].get("reasoning_tokens") == (30 if provider == "gemini" else None)
    assert record["tool_messages"][0]["reasoning"] == "I should calculate."

    # A later turn of the conversation sends both rounds' signed state back to the same provider.
    upstream.reset(Reply(chunks=BODIES[provider](["Yes."])))
    later = open_stream(f"{url}/api/chat/stream", json_body={
        "provider": provider, "model": THINKING_MODELS[provider], "prompt": "Sure?", "reasoning": "low",
        "conversation_id": events[0].data["conversation_id"]}).read_all()
    assert later[-1].event == "done" and text_of(later) == "Yes."
    sent = upstream.last().body
    if provider == "anthropic":
        assert [[b["type"] for b in m["content"]] for m in sent["messages"] if m["role"] == "assistant"] == [
            ["thinking", "tool_use"], ["thinking", "text"]]
    else:
        model_turn = [c for c in sent["contents"] if c["role"] == "model"]
        assert model_turn[0]["parts"][0]["thoughtSignature"] == thought_signature("calculate")
        assert model_turn[1]["parts"] == [{"text": "It is 42.", "thoughtSignature": thought_signature("answer")}]


def test_the_fake_refuses_tool_rounds_without_their_thinking_state(upstream):
    """What the relay did before it kept signatures: the second round is refused, as the real APIs do."""
    upstream.reset(Reply(chunks=BODIES["anthropic"](["x"])))
    tool_round = [{"role": "user", "content": "q"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]
    anthropic = {"model": "c", "max_tokens": 2048, "messages": tool_round,
                 "thinking": {"type": "enabled", "budget_tokens": 1024}}
    refused = requests.post(f"{upstream.url}/v1/messages", json=anthropic, timeout=10)
    assert refused.status_code == 400 and "must start with a thinking block" in refused.text
    hot = requests.post(f"{upstream.url}/v1/messages", json={**anthropic, "messages": tool_round[:1],
                                                             "temperature": 0.5}, timeout=10)
    assert hot.status_code == 400 and "temperature" in hot.text
    contents = [{"role": "user", "parts": [{"text": "q"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"result": "1"}}}]}]
    gemini = requests.post(f"{upstream.url}/models/gemini-3-pro-preview:streamGenerateContent?alt=sse",
                           json={"contents": contents}, timeout=10)
    assert gemini.status_code == 400 and "missing a thought_signature" in gemini.text
    older = requests.post(f"{upstream.url}/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                          json={"contents": contents}, timeout=10)
    assert older.status_code == 200  # 2.5 models do not enforce it


def test_signed_state_is_dropped_for_another_provider(upstream, live):
    """After a turn answered by Anthropic with thinking, a turn sent to Gemini gets the text only."""
    upstream.reset(Reply(chunks=anthropic_thinking_body(["Hmm."], ["Hello."])))
    url = live()
    first = open_stream(f"{url}/api/chat/stream", json_body={"provider": "anthropic", "prompt": "hi",
                                                              "reasoning": "medium"}).read_all()
    assert [e.event for e in first].count("reasoning") == 1
    upstream.reset(Reply(chunks=BODIES["gemini"](["Hi again."])))
    open_stream(f"{url}/api/chat/stream", json_body={"provider": "gemini", "prompt": "again", "reasoning": "low",
                                                      "conversation_id": first[0].data["conversation_id"]}).read_all()
    assert upstream.last().body["contents"][1] == {"role": "model", "parts": [{"text": "Hello."}]}


def test_reasoning_on_rest_post_sse_and_websocket(upstream, live):
    from simple_websocket import Client

    url = live()
    upstream.reset(Reply(chunks=openai_reasoning_body(["Think", "ing."], ["Four."])))
    rest = requests.post(f"{url}/api/chat", json={"provider": "openai-compatible", "prompt": "2+2",
                                                  "reasoning": "high"}, timeout=10).json()
    assert rest["content"] == "Four." and rest["reasoning"] == "Thinking."
    assert upstream.last().body["reasoning_effort"] == "high"
    assert rest["usage"]["reasoning_tokens"] == 2

    ticket = requests.post(f"{url}/api/chat/streams", json={"provider": "openai-compatible", "prompt": "2+2",
                                                            "reasoning": "low"}, timeout=10).json()
    events = open_stream(url + ticket["stream_url"]).read_all()
    assert [e.data["text"] for e in events if e.event == "reasoning"] == ["Think", "ing."]
    assert upstream.last().body["reasoning_effort"] == "low"  # the ticket kept the option

    query = open_stream(f"{url}/api/chat/stream?provider=openai-compatible&prompt=q&reasoning=medium").read_all()
    assert text_of(query) == "Four." and upstream.last().body["reasoning_effort"] == "medium"

    ws = Client.connect(url.replace("http", "ws") + "/api/chat/ws")
    try:
        ws.send(json.dumps({"provider": "openai-compatible", "prompt": "q", "reasoning": "low"}))
        received = ""
        while "event: done" not in received:
            received += ws.receive(timeout=5) or ""
    finally:
        close_ws(ws)
    assert 'event: reasoning\ndata: {"text":"Think"}' in received


def test_bad_reasoning_option_is_a_400(client):
    response = client.post("/api/chat", json={"prompt": "q", "reasoning": "max"})
    assert response.status_code == 400 and "'reasoning' must be one of" in response.get_json()["error"]["message"]


def test_demo_thinks_offline(live):
    events = open_stream(f"{live()}/api/chat/stream?provider=demo&prompt=hi&reasoning=medium").read_all()
    names = [e.event for e in events]
    assert names.count("reasoning") > 3 and names.index("reasoning") < names.index("token")
