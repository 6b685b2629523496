"""The relay under gunicorn against a real model server: llama.cpp with Gemma 3 270M on
this machine (tests/local_model.py), spoken to as `openai-compatible` (chat completions)
and as `anthropic` (llama.cpp's `/v1/messages`).

What the fakes cannot show: the text a real server generates arrives unchanged, a reader
who leaves or presses Stop really stops the generation (llama.cpp's `/slots` goes idle and
its token counter stops far short of what was asked for), a resumed POST-SSE stream
costs one generation, counted by llama.cpp itself, and the thinking llama.cpp's own
reasoning parser streams as `reasoning_content` reaches the reader as reasoning, apart from
the answer. One slot at temperature 0 answers the same prompt the same way every time, so a
direct call is the expected text.
"""

from __future__ import annotations

from urllib.parse import urlencode

import openai
import pytest
import requests

from tests import servers
from tests.conftest import free_port, open_stream, text_of
from tests.local_model import MODEL

PROMPT = "What is the capital of France?"
SHORT = 24  # tokens: a third of a second of generation here
# Tokens asked for by the streams that are stopped: about 40 s of generation on this
# machine, so a slot that goes idle within seconds was stopped, not finished.
LONG = 3000
# provider name in the relay -> the wire format llama.cpp answers it in
WIRES = {"openai-compatible": "openai", "anthropic": "anthropic"}


@pytest.fixture(scope="module")
def relay(local_model, tmp_path_factory):
    """One gunicorn worker with both providers pointed at llama.cpp."""
    store = tmp_path_factory.mktemp("relay") / "relay.sqlite3"
    server = servers.gunicorn(free_port(), {
        "LLM_RELAY_ENV_FILE": "/nonexistent",
        "LLM_PROVIDER": "openai-compatible",
        "LLM_MODEL": MODEL,
        "OPENAI_COMPATIBLE_BASE_URL": f"{local_model.url}/v1",
        # The relay adds /v1/messages; llama.cpp ignores the key and the model name.
        "ANTHROPIC_BASE_URL": local_model.url,
        "ANTHROPIC_API_KEY": "not-checked-by-llama.cpp",
        "STORE_URL": f"sqlite:///{store}",
        "SSE_HEARTBEAT_SECONDS": "0.5",
        "STREAM_GRACE_SECONDS": "10",
    })
    yield server.url
    server.stop()


@pytest.fixture
def model(local_model):
    """The model server with nothing left running by the test before."""
    local_model.wait_idle()
    return local_model


def stream_url(relay: str, provider: str, max_tokens: int, **options: str) -> str:
    query = urlencode({"prompt": PROMPT, "provider": provider, "temperature": 0, "max_tokens": max_tokens,
                       **options})
    return f"{relay}/api/chat/stream?{query}"


def create_stream(relay: str, provider: str, max_tokens: int) -> str:
    body = {"prompt": PROMPT, "provider": provider, "temperature": 0, "max_tokens": max_tokens}
    response = requests.post(f"{relay}/api/chat/streams", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return relay + response.json()["stream_url"]


@pytest.mark.parametrize("provider", WIRES)
def test_relayed_text_is_the_models_text(provider, relay, model):
    expected = model.answer(WIRES[provider], PROMPT, SHORT)
    before = model.tokens_predicted()
    events = open_stream(stream_url(relay, provider, SHORT)).read_all()
    assert events[0].event == "msgid" and events[0].data["provider"] == provider
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "length"
    assert expected.strip() and text_of(events) == expected
    assert model.tokens_predicted() - before == SHORT  # one call upstream, nothing retried


@pytest.mark.parametrize("provider", WIRES)
def test_a_reader_who_leaves_stops_the_generation(provider, relay, model):
    before = model.tokens_predicted()
    reader = open_stream(stream_url(relay, provider, LONG))
    assert [e.event for e in reader.take(6)] == ["msgid"] + ["token"] * 5
    assert model.generating()
    reader.close()
    model.wait_idle()
    assert model.tokens_predicted() - before < LONG // 2


@pytest.mark.parametrize("provider", WIRES)
def test_stop_on_a_post_sse_stream_stops_the_generation(provider, relay, model):
    before = model.tokens_predicted()
    url = create_stream(relay, provider, LONG)
    reader = open_stream(url)
    assert [e.event for e in reader.take(6)] == ["msgid"] + ["token"] * 5
    assert model.generating()
    assert requests.delete(url, timeout=10).json()["status"] == "stopped"
    events = reader.read_all()
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "stopped"
    model.wait_idle()
    assert model.tokens_predicted() - before < LONG // 2


def test_a_resumed_post_sse_stream_is_one_generation(relay, model):
    """The reader leaves mid-answer and comes back with Last-Event-ID: the answer goes on
    (STREAM_GRACE_SECONDS), the reader gets every token once, and llama.cpp generated it once."""
    max_tokens = 96  # a second and more of generation: the reader comes back while it runs
    before = model.tokens_predicted()
    url = create_stream(relay, "openai-compatible", max_tokens)
    first = open_stream(url)
    got = first.take(6)
    first.close()
    rest = open_stream(url, headers={"Last-Event-ID": got[-1].id}).read_all()
    events = got + rest
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))  # none twice, none missing
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "length"
    model.wait_idle()
    assert model.tokens_predicted() - before == max_tokens
    assert text_of(events) == model.answer("openai", PROMPT, max_tokens)


# Reasoning: asked for with `reasoning_effort`, which the relay sends for its `reasoning`
# option and llama.cpp hands to scripts/local_model.py's template. That template then shows
# the model worked examples that think in <think>...</think> and opens <think> for it;
# llama.cpp streams the thinking as `delta.reasoning_content` and the rest as `content`.

@pytest.fixture(scope="module")
def direct_reasoning(local_model):
    """What llama.cpp streams when asked directly: (reasoning pieces, answer pieces)."""
    local_model.wait_idle()
    thinking, answer = local_model.streamed(PROMPT, SHORT, "low")
    assert thinking and answer  # llama.cpp itself split the model's text in two
    return thinking, answer


def test_reasoning_streams_as_reasoning_events_and_the_answer_as_tokens(relay, model, direct_reasoning):
    thinking, answer = direct_reasoning
    before = model.tokens_predicted()
    events = open_stream(stream_url(relay, "openai-compatible", SHORT, reasoning="low")).read_all()
    assert events[0].event == "msgid" and events[-1].event == "done"
    text_events = [e.event for e in events if e.event in ("reasoning", "token")]
    assert text_events == ["reasoning"] * len(thinking) + ["token"] * len(answer)  # thinking first, then the answer
    assert [e.data["text"] for e in events if e.event == "reasoning"] == thinking
    assert [e.data["text"] for e in events if e.event == "token"] == answer
    assert events[-1].data["finish_reason"] == "length"
    assert model.tokens_predicted() - before == SHORT  # one call upstream, nothing retried


def test_v1_streams_reasoning_content_to_the_openai_sdk(relay, model, direct_reasoning):
    thinking, answer = direct_reasoning
    client = openai.OpenAI(base_url=f"{relay}/v1", api_key="not-checked", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=SHORT,
        reasoning_effort="low", stream=True)
    reasoning, content, finish = [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            piece = (choice.delta.model_extra or {}).get("reasoning_content")  # not in the SDK's types
            if piece:
                reasoning.append(piece)
            if choice.delta.content:
                content.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert "".join(reasoning) == "".join(thinking) != ""
    assert "".join(content) == "".join(answer) != ""
    assert finish == ["length"]
