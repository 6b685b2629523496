"""Failover (LLM_FALLBACKS): a provider that fails before or during its answer is replaced,
and the reader sees `meta {"failover"}` and more tokens, never an error."""

from __future__ import annotations

import pytest
import requests

from app import create_app
from app.config import ConfigError
from tests.conftest import app_config, open_stream, text_of
from tests.fake_upstream import BODIES, Reply

CHAIN = {"LLM_FALLBACKS": "anthropic/claude-fallback,gemini/gemini-fallback", "UPSTREAM_MAX_RETRIES": 0}


def failover_events(events):
    return [e.data["failover"] for e in events if e.event == "meta" and "failover" in e.data]


def conversation(url, conversation_id):
    return requests.get(f"{url}/api/conversations/{conversation_id}", timeout=10).json()["messages"]


def test_a_provider_that_fails_before_its_first_token_is_replaced(upstream, live):
    upstream.reset(Reply(status=503, content_type="application/json", chunks=[b'{"error": {"message": "down"}}']),
                   Reply(chunks=BODIES["anthropic"](["Served ", "by Claude."])))
    url = live(**CHAIN)
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert text_of(events) == "Served by Claude." and events[-1].event == "done"
    assert failover_events(events) == [{"from": "openai/gpt-4.1-mini", "to": "anthropic/claude-fallback",
                                        "reason": "upstream_error", "after_chars": 0, "status": 503}]
    first, second = upstream.seen
    assert first.path == "/chat/completions" and second.path == "/v1/messages"
    assert second.body["model"] == "claude-fallback" and second.body["messages"] == [{"role": "user",
                                                                                     "content": "hi"}]
    record = conversation(url, events[0].data["conversation_id"])[-1]
    assert record["status"] == "done" and record["failover"][0]["to"] == "anthropic/claude-fallback"


def test_mid_answer_failure_continues_on_the_next_provider_with_a_prefill(upstream, live):
    cut = BODIES["openai"](["Rivers: ", "the Rhine, ", "the Dan"], done=False)[:-2]  # the connection drops
    upstream.reset(Reply(chunks=cut), Reply(chunks=BODIES["anthropic"](["ube and the Loire."])))
    url = live(**CHAIN)
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=rivers").read_all()
    assert [e.event for e in events].count("error") == 0 and events[-1].event == "done"
    assert text_of(events) == "Rivers: the Rhine, the Danube and the Loire."
    (switch,) = failover_events(events)
    assert switch["reason"] == "upstream_disconnected" and switch["after_chars"] == len("Rivers: the Rhine, the Dan")
    # Anthropic continues a final assistant turn: the text so far is its beginning.
    assert upstream.last().body["messages"][-1] == {"role": "assistant", "content": "Rivers: the Rhine, the Dan"}
    record = conversation(url, events[0].data["conversation_id"])[-1]
    assert record["content"] == "Rivers: the Rhine, the Danube and the Loire."


def test_mid_answer_stall_continues_on_an_openai_style_provider_with_an_instruction(upstream, live):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["Once upon ", "a time"]), stall_after=5),
                   Reply(chunks=BODIES["openai"]([" there was a relay."])))
    url = live(LLM_FALLBACKS="openai/gpt-fallback", UPSTREAM_READ_TIMEOUT=1, UPSTREAM_MAX_RETRIES=0)
    events = open_stream(f"{url}/api/chat/stream?provider=anthropic&prompt=story").read_all()
    assert text_of(events) == "Once upon a time there was a relay." and events[-1].event == "done"
    assert failover_events(events)[0]["reason"] == "upstream_timeout"
    sent = upstream.last().body["messages"]
    assert sent[-2] == {"role": "assistant", "content": "Once upon a time"}
    assert sent[-1]["role"] == "user" and "Continue it exactly where it stopped" in sent[-1]["content"]


def test_rest_fails_over_too_and_an_exhausted_chain_is_an_error(upstream, live):
    down = Reply(status=500, content_type="application/json", chunks=[b'{"error": {"message": "boom"}}'])
    upstream.reset(down, Reply(chunks=BODIES["anthropic"](["ok"])))
    url = live(**CHAIN)
    body = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi"}, timeout=10).json()
    assert body["content"] == "ok"
    upstream.reset(down)  # every provider fails
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert events[-1].event == "error" and len(failover_events(events)) == 2
    assert len(upstream.seen) == 3


def test_a_stream_the_reader_left_is_not_failed_over(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05))
    reader = open_stream(f"{live(**CHAIN)}/api/chat/stream?provider=openai&prompt=hi")
    reader.until("token")
    reader.close()
    assert upstream.wait_for_request().closed.wait(3)
    assert len(upstream.seen) == 1  # nobody is reading: no second provider is called


def test_unknown_fallback_providers_fail_at_startup(upstream):
    with pytest.raises(ConfigError, match="LLM_FALLBACKS"):
        create_app(app_config(upstream.url, LLM_FALLBACKS="nope/model"))
