"""Failover (LLM_FALLBACKS): a provider that fails before or during its answer is replaced,
and the reader sees `meta {"failover"}` and more tokens, never an error."""

from __future__ import annotations

import pytest
import requests

from app import create_app
from app.config import ConfigError
from tests.conftest import app_config, open_stream, text_of
from tests.fake_upstream import BODIES, Reply, anthropic_tool_use_body

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
    # Which provider took over and why, in our words: no upstream status or message.
    assert failover_events(events) == [{"from": "openai/gpt-4.1-mini", "to": "anthropic/claude-fallback",
                                        "reason": "upstream_error", "after_chars": 0}]
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


def error_reply(status: int, message: str = "nope") -> Reply:
    return Reply(status=status, content_type="application/json",
                 chunks=[b'{"error": {"message": "%s"}}' % message.encode()])


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_refusal_the_request_caused_is_not_failed_over(status, upstream, live):
    """Attack: a request the primary refuses (a bad model name, a malformed body) was answered
    by the fallback: any refusal became a way to reach the fallback provider."""
    upstream.reset(error_reply(status), Reply(chunks=BODIES["anthropic"](["fallback answer"])))
    url = live(LLM_FALLBACKS="anthropic/claude-fallback")
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert events[-1].event == "error" and not failover_events(events)
    assert [s.path for s in upstream.seen] == ["/chat/completions"]


@pytest.mark.parametrize("failure", ["500", "429", "unreachable"])
def test_a_provider_failure_costs_one_call_before_the_fallback(failure, upstream, live):
    """A 500 cost three primary calls (two retries) plus the fallback; with a fallback ready,
    the fallback is the retry."""
    upstream.reset(*([error_reply(int(failure))] if failure != "unreachable" else []),
                   Reply(chunks=BODIES["anthropic"](["from the fallback"])))
    extra = {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"} if failure == "unreachable" else {}
    url = live(LLM_FALLBACKS="anthropic/claude-fallback", UPSTREAM_MAX_RETRIES=2, **extra)
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert text_of(events) == "from the fallback"
    assert not [e for e in events if e.event == "meta" and "retry" in e.data]
    assert [s.path for s in upstream.seen] == (["/chat/completions"] if failure != "unreachable" else []) + [
        "/v1/messages"]


def test_tool_rounds_stay_with_the_provider_that_answered(upstream, live):
    """Each tool round started at the failing primary again (and paid its retries again)."""
    upstream.reset(error_reply(500), Reply(chunks=anthropic_tool_use_body("t1", "calculate", '{"expression": "6*7"}')),
                   Reply(chunks=BODIES["anthropic"](["It is 42."])))
    url = live(LLM_FALLBACKS="anthropic/claude-fallback", UPSTREAM_MAX_RETRIES=2)
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=calc&tools=calculate").read_all()
    assert text_of(events) == "It is 42." and events[-1].event == "done"
    assert [s.path for s in upstream.seen] == ["/chat/completions", "/v1/messages", "/v1/messages"]
    assert len(failover_events(events)) == 1


def test_retries_are_one_budget_for_the_whole_request(upstream, live):
    """Without a fallback, each tool round had UPSTREAM_MAX_RETRIES of its own."""
    tool_round = Reply(chunks=anthropic_tool_use_body("t1", "calculate", '{"expression": "6*7"}'))
    upstream.reset(error_reply(503), tool_round, error_reply(503), Reply(chunks=BODIES["anthropic"](["42"])))
    url = live(UPSTREAM_MAX_RETRIES=1, UPSTREAM_RETRY_BASE_SECONDS=0.01)
    events = open_stream(f"{url}/api/chat/stream?provider=anthropic&prompt=calc&tools=calculate").read_all()
    assert events[-1].event == "error" and events[-1].data["status"] == 503
    assert len(upstream.seen) == 3  # the first call, its one retry, the second round's call


def test_callers_name_only_allowed_models(upstream, live):
    """Any model name was forwarded (`"model": "fail400-anything"`); now each provider has an
    allow-list: its listed models and configured default unless ALLOWED_MODELS says more."""
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    url = live()
    for body in ({"provider": "openai", "prompt": "hi", "model": "fail400-anything"},
                 {"provider": "openai", "prompt": "hi", "model": "claude-sonnet-4-5"}):
        refused = requests.post(f"{url}/api/chat", json=body, timeout=10)
        assert refused.status_code == 400 and refused.json()["error"]["type"] == "model_not_allowed"
    v1 = requests.post(f"{url}/v1/chat/completions", json={"model": "openai/o1-pro", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=10)
    assert v1.status_code == 400 and v1.json()["error"]["code"] == "model_not_allowed"
    assert requests.post(f"{url}/api/chat/streams", json={"provider": "openai", "prompt": "hi", "model": "x"},
                         timeout=10).status_code == 400
    assert upstream.seen == []
    listed = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi", "model": "gpt-4.1"},
                           timeout=10)
    assert listed.status_code == 200 and upstream.last().body["model"] == "gpt-4.1"
    assert requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi"}, timeout=10).ok
    wider = live(ALLOWED_MODELS="openai/*,anthropic/claude-opus-4-1")
    for provider, model in (("openai", "anything-at-all"), ("anthropic", "claude-opus-4-1"),
                            ("anthropic", "claude-sonnet-4-5")):
        upstream.reset(Reply(chunks=BODIES[provider](["ok"])))
        answer = requests.post(f"{wider}/api/chat", json={"provider": provider, "prompt": "hi", "model": model},
                               timeout=10)
        assert answer.status_code == 200, answer.text
    refused = requests.post(f"{wider}/api/chat", json={"provider": "gemini", "prompt": "hi", "model": "gemini-x"},
                            timeout=10)
    assert refused.status_code == 400


def test_a_configured_default_model_and_alias_targets_are_allowed(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    url = live(LLM_PROVIDER="openai", LLM_MODEL="gpt-5-house", MODEL_ALIASES="fast=groq/llama-3.1-8b-instant")
    assert requests.post(f"{url}/api/chat", json={"prompt": "hi"}, timeout=10).ok
    assert upstream.last().body["model"] == "gpt-5-house"
    v1 = requests.post(f"{url}/v1/chat/completions", json={"model": "fast", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=10)
    assert v1.ok and upstream.last().body["model"] == "llama-3.1-8b-instant"


def test_a_malformed_allow_list_fails_at_startup(upstream):
    with pytest.raises(ConfigError, match="ALLOWED_MODELS"):
        create_app(app_config(upstream.url, ALLOWED_MODELS="gpt-4.1"))
