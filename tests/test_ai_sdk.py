"""`POST /api/chat/ui` driven by the real `ai` npm package under Node: its own chat transport
(`DefaultChatTransport`, what `useChat` uses) and its own UI message stream reader."""

from __future__ import annotations

import json

import requests

from tests.conftest import run_node
from tests.fake_upstream import BODIES, TRICKY_TEXT, Reply, gemini_thinking_body, hostile_chunks, thought_signature


def test_use_chat_transport_assembles_the_upstream_text(upstream, live):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT))))
    result = run_node("ai_client.mjs", "text", live())
    assert result["role"] == "assistant" and result["text"] == "".join(TRICKY_TEXT)
    assert result["updates"] >= 3  # the message grew as the stream came in
    assert upstream.last().body["messages"] == [{"role": "user", "content": "hi"}]


def test_server_tools_arrive_as_tool_parts_and_replay_in_the_next_turn(upstream, live):
    url = live()
    result = run_node("ai_client.mjs", "tools", url)
    assert result["tool"] == {"state": "output-available", "input": {"expression": "6 * 7"}, "output": 42}
    assert "42" in result["text"]
    upstream.reset(Reply(chunks=BODIES["openai"](["Still 42."])))
    assert run_node("ai_client.mjs", "history", url)["text"] == "Still 42."
    sent = upstream.last().body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "calculate" and sent[2]["content"] == "42"


def test_aborting_closes_the_upstream(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    result = run_node("ai_client.mjs", "abort", live())
    assert result["updates"] == 3, result
    assert upstream.wait_for_request().closed.wait(3), "the upstream kept generating after the abort"


def test_protocol_frames_and_headers(upstream, live):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["a", "b"], error_after=1)))
    body = {"id": "c", "trigger": "submit-message", "provider": "anthropic",
            "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    response = requests.post(f"{live()}/api/chat/ui", json=body, timeout=10)
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["Content-Type"].startswith("text/event-stream")
    frames = [line for line in response.text.split("\n\n") if line]
    assert frames[0].startswith('data: {"type":"start"') and '"type":"text-delta"' in response.text
    assert '"type":"error","errorText":"anthropic reported an error during the answer"' in response.text
    assert "Overloaded" not in response.text  # the provider's words go to the log
    assert frames[-1] == "data: [DONE]" and "retry:" not in response.text


def test_bad_ui_messages_are_a_clear_400(client):
    for messages in ([], [{"role": "user"}], [{"role": "robot", "parts": []}],
                     [{"role": "user", "parts": [{"type": "file", "url": "x", "mediaType": "image/png"}]}],
                     [{"role": "user", "parts": [{"type": []}]}], [{"role": "assistant", "parts": [{"type": {}}]}],
                     [{"role": "assistant", "parts": [{"type": "text", "text": "hi"}]}]):
        response = client.post("/api/chat/ui", json={"id": "c", "messages": messages})
        assert response.status_code == 400, (messages, response.get_data(as_text=True))
        assert response.get_json()["error"]["type"] == "invalid_request"
    many = [{"role": "user", "parts": [{"type": "text", "text": "x"}]}] * 201
    too_many = client.post("/api/chat/ui", json={"id": "c", "messages": many})
    assert too_many.status_code == 413 and too_many.get_json()["error"]["type"] == "prompt_too_large"
    extra = {"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": "x"}]}], "bogus": 1}
    assert client.post("/api/chat/ui", json=extra).get_json()["error"]["message"].startswith("unknown option")


def test_reasoning_and_server_tool_rounds_with_thinking_as_ui_parts(upstream, live):
    """Gemini 3 thinks, calls a server-side tool, thinks again and answers: the reasoning arrives
    as reasoning-start/delta/end parts, and the second round carries the call's signature (the
    fake refuses it otherwise)."""
    upstream.reset(Reply(chunks=gemini_thinking_body(["Need ", "a tool."], call=("calculate", {"expression": "6*7"}))),
                   Reply(chunks=gemini_thinking_body(["Got 42."], ["It is ", "42."])))
    body = {"id": "c", "trigger": "submit-message", "provider": "gemini", "model": "gemini-3-pro-preview",
            "tools": True, "reasoning": "high",
            "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "6*7?"}]}]}
    response = requests.post(f"{live()}/api/chat/ui", json=body, timeout=10)
    parts = [json.loads(frame[6:]) for frame in response.text.split("\n\n") if frame.startswith("data: {")]
    kinds = [p["type"] for p in parts]
    assert kinds == ["start", "start-step",
                     "reasoning-start", "reasoning-delta", "reasoning-delta", "reasoning-end",
                     "tool-input-available", "tool-output-available",
                     "reasoning-start", "reasoning-delta", "reasoning-end",
                     "text-start", "text-delta", "text-delta", "text-end", "finish-step", "finish"], kinds
    ids = {p["id"] for p in parts if p["type"].startswith("reasoning-")}
    assert len(ids) == 2  # one block per round
    assert "".join(p["delta"] for p in parts if p["type"] == "reasoning-delta") == "Need a tool.Got 42."
    assert upstream.last().body["contents"][1]["parts"][0]["thoughtSignature"] == thought_signature("calculate")
    assert upstream.seen[0].body["generationConfig"]["thinkingConfig"] == {"includeThoughts": True,
                                                                           "thinkingLevel": "high"}
