"""Provider adapters against `responses` mocks: request shape, stream parsing, errors."""

import json

import pytest
import requests
import responses

from app.config import Settings
from app.providers import build_providers
from app.providers.domain import (
    Cancellation,
    Finish,
    Meta,
    ProviderError,
    Reasoning,
    Signed,
    Task,
    Text,
    ToolCall,
    Usage,
)
from app.providers.transport import retry_after_from_headers
from tests.conftest import PROVIDERS, provider_env
from tests.fake_upstream import (
    BODIES,
    TRICKY_TEXT,
    anthropic_thinking_body,
    gemini_thinking_body,
    openai_reasoning_body,
    sse,
    thinking_signature,
    thought_signature,
)

BASE = "http://upstream.test"
URLS = {
    "openai": f"{BASE}/chat/completions", "groq": f"{BASE}/chat/completions",
    "mistral": f"{BASE}/chat/completions", "openai-compatible": f"{BASE}/chat/completions",
    "anthropic": f"{BASE}/v1/messages", "gemini": f"{BASE}/models/m:streamGenerateContent?alt=sse",
}


def provider(name, **settings):
    env = {**provider_env(BASE), **{k: str(v) for k, v in settings.items()}}
    return build_providers(env, Settings.load({"UPSTREAM_RETRY_BASE_SECONDS": "0.01", **env}))[name]


def task(**kw):
    return Task(messages=[{"role": "user", "content": "hi"}], model="m", **kw)


def run(p, t=None):
    return list(p.stream(t or task(), Cancellation()))


def texts(deltas):
    return "".join(d.text for d in deltas if isinstance(d, Text))


def reasoning(deltas):
    return "".join(d.text for d in deltas if isinstance(d, Reasoning))


def mock(name, frames, status=200, headers=None):
    responses.add(responses.POST, URLS[name], body=b"".join(frames), status=status,
                  content_type="text/event-stream", headers=headers or {})


@pytest.mark.parametrize("name", PROVIDERS)
@responses.activate
def test_stream_text_usage_and_finish(name):
    mock(name, BODIES[name](TRICKY_TEXT))
    deltas = run(provider(name))
    assert texts(deltas) == "".join(TRICKY_TEXT)
    assert [d.reason for d in deltas if isinstance(d, Finish)] == ["stop"]
    usages = [d.usage for d in deltas if isinstance(d, Usage)]
    if name != "openai-compatible":
        assert usages[-1]["output_tokens"] == len(TRICKY_TEXT)


@pytest.mark.parametrize("name", PROVIDERS)
@responses.activate
def test_stream_without_end_marker_is_an_error(name):
    mock(name, BODIES[name](["a", "b"], done=False))
    with pytest.raises(ProviderError) as err:
        run(provider(name))
    assert err.value.type == "upstream_disconnected"


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini", "groq"])
@responses.activate
def test_error_inside_the_stream(name):
    mock(name, BODIES[name](["a", "b", "c"], error_after=2))
    deltas = []
    with pytest.raises(ProviderError) as err:
        for d in provider(name).stream(task(), Cancellation()):
            deltas.append(d)
    assert texts(deltas) == "ab"
    assert err.value.type == "upstream_error"


@responses.activate
def test_openai_request_body():
    mock("openai", BODIES["openai"](["x"]))
    run(provider("openai"), task(system="be brief", temperature=0.2, max_tokens=50))
    call = responses.calls[0].request
    body = json.loads(call.body)
    assert call.headers["Authorization"] == "Bearer test-key"
    assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 50 and body["temperature"] == 0.2


@pytest.mark.parametrize("name", ["groq", "mistral"])
@responses.activate
def test_groq_and_mistral_get_no_stream_options(name):
    mock(name, BODIES[name](["x"]))
    run(provider(name), task(max_tokens=5))
    body = json.loads(responses.calls[0].request.body)
    assert "stream_options" not in body and body["max_tokens"] == 5


@responses.activate
def test_anthropic_request_body():
    mock("anthropic", BODIES["anthropic"](["x"]))
    run(provider("anthropic"), task(system="sys"))
    call = responses.calls[0].request
    body = json.loads(call.body)
    assert call.headers["x-api-key"] == "test-key" and call.headers["anthropic-version"] == "2023-06-01"
    assert body["system"] == "sys" and body["max_tokens"] > 0
    assert all(m["role"] != "system" for m in body["messages"])


@responses.activate
def test_gemini_request_body():
    mock("gemini", BODIES["gemini"](["x"]))
    run(provider("gemini"), Task(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                           {"role": "user", "content": "q2"}],
                                 model="m", system="sys", max_tokens=9))
    call = responses.calls[0].request
    body = json.loads(call.body)
    assert call.headers["x-goog-api-key"] == "test-key"
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["systemInstruction"] == {"parts": [{"text": "sys"}]}
    assert body["generationConfig"] == {"maxOutputTokens": 9}


@responses.activate
def test_gemini_thoughts_are_not_answer_text_and_blocked_prompts_are_reported():
    frames = [sse({"candidates": [{"content": {"parts": [{"text": "hmm", "thought": True}, {"text": "Yes"}]},
                                   "finishReason": "STOP"}]})]
    mock("gemini", frames)
    deltas = run(provider("gemini"))
    assert texts(deltas) == "Yes" and reasoning(deltas) == "hmm"
    responses.replace(responses.POST, URLS["gemini"], body=sse({"promptFeedback": {"blockReason": "SAFETY"}}),
                      )
    with pytest.raises(ProviderError, match="blocked the prompt") as blocked:
        run(provider("gemini"))
    assert blocked.value.detail == "SAFETY"  # Gemini's words: for the log, not the client


@responses.activate
def test_openai_tool_call_fragments_are_joined():
    base = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                "function": {"name": "now", "arguments": ""}}]}}]}
    frag = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"tz":'}}]}}]}
    frag2 = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"UTC"}'}}]}}]}
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    mock("openai", [sse(base), sse(frag), sse(frag2), sse(end), b"data: [DONE]\n\n"])
    calls = [d for d in run(provider("openai")) if isinstance(d, ToolCall)]
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [("call_1", "now", {"tz": "UTC"})]


@responses.activate
def test_anthropic_tool_use_blocks():
    frames = [
        sse({"type": "message_start", "message": {"usage": {"input_tokens": 1}}}, "message_start"),
        sse({"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "tu_1", "name": "calc", "input": {}}}, "content_block_start"),
        sse({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"e'}},
            "content_block_delta"),
        sse({"type": "content_block_delta", "index": 1,
             "delta": {"type": "input_json_delta", "partial_json": 'xpr": "1+1"}'}}, "content_block_delta"),
        sse({"type": "content_block_stop", "index": 1}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}},
            "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    mock("anthropic", frames)
    deltas = run(provider("anthropic"))
    calls = [d for d in deltas if isinstance(d, ToolCall)]
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [("tu_1", "calc", {"expr": "1+1"})]
    assert [d.reason for d in deltas if isinstance(d, Finish)] == ["tool_calls"]


@pytest.mark.parametrize("name,body,message", [
    ("openai", {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}, "Incorrect API key"),
    ("anthropic", {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
     "authentication_error: invalid x-api-key"),
    ("mistral", {"object": "error", "message": "Unauthorized", "type": "invalid_request"}, "Unauthorized"),
    ("gemini", {"error": {"code": 400, "message": "API key not valid", "status": "INVALID_ARGUMENT"}},
     "API key not valid"),
])
@responses.activate
def test_error_bodies_before_the_stream(name, body, message):
    responses.add(responses.POST, URLS[name], json=body, status=401)
    with pytest.raises(ProviderError) as err:
        run(provider(name))
    # The provider's words are read (for the log); the client-facing message is ours.
    assert err.value.status == 401 and message in err.value.detail and message not in err.value.message
    assert err.value.type == "upstream_auth"
    assert len(responses.calls) == 1  # never retried


@responses.activate
def test_429_is_retried_honouring_retry_after_then_succeeds():
    responses.add(responses.POST, URLS["openai"], json={"error": {"message": "slow down"}}, status=429,
                  headers={"retry-after-ms": "20"})
    mock("openai", BODIES["openai"](["ok"]))
    deltas = run(provider("openai"))
    assert texts(deltas) == "ok"
    retry = [d.data["retry"] for d in deltas if isinstance(d, Meta) and "retry" in d.data]
    reason = "openai is rate limiting this server (HTTP 429); try again shortly"  # ours, not "slow down"
    assert retry == [{"attempt": 1, "delay": 0.02, "status": 429, "reason": reason}]


@responses.activate
def test_5xx_retries_are_bounded():
    responses.add(responses.POST, URLS["openai"], json={"error": {"message": "boom"}}, status=503)
    with pytest.raises(ProviderError) as err:
        run(provider("openai", UPSTREAM_MAX_RETRIES=2))
    assert err.value.status == 503 and len(responses.calls) == 3


@responses.activate
def test_retry_after_beyond_the_bound_is_not_waited_for():
    responses.add(responses.POST, URLS["openai"], json={"error": {"message": "later"}}, status=429,
                  headers={"retry-after": "3600"})
    with pytest.raises(ProviderError):
        run(provider("openai"))
    assert len(responses.calls) == 1


@responses.activate
def test_gemini_retry_delay_from_the_body():
    body = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED",
                      "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.03s"}]}}
    responses.add(responses.POST, URLS["gemini"], json=body, status=429)
    mock("gemini", BODIES["gemini"](["fine"]))
    deltas = run(provider("gemini"))
    assert texts(deltas) == "fine"
    assert [d.data["retry"]["delay"] for d in deltas if isinstance(d, Meta) and "retry" in d.data] == [0.03]


@responses.activate
def test_no_retry_after_the_first_token():
    mock("openai", BODIES["openai"](["a", "b"], done=False))
    mock("openai", BODIES["openai"](["never"]))
    with pytest.raises(ProviderError):
        run(provider("openai"))
    assert len(responses.calls) == 1


@responses.activate
def test_connection_error_before_the_stream_is_retried():
    responses.add(responses.POST, URLS["openai"], body=requests.ConnectionError("refused"))
    mock("openai", BODIES["openai"](["up"]))
    assert texts(run(provider("openai"))) == "up"


@responses.activate
def test_rate_limit_headers_become_meta():
    mock("openai", BODIES["openai"](["x"]), headers={"x-ratelimit-remaining-requests": "99"})
    metas = [d.data for d in run(provider("openai")) if isinstance(d, Meta)]
    assert {"rate_limit": {"x-ratelimit-remaining-requests": "99"}} in metas


def test_retry_after_header_forms():
    assert retry_after_from_headers({"retry-after": "2"}) == 2
    assert retry_after_from_headers({"retry-after-ms": "1500"}) == 1.5
    assert 0 <= retry_after_from_headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) <= 0
    assert retry_after_from_headers({}) is None


def test_demo_is_offline_and_respects_max_tokens():
    demo = provider("demo")
    deltas = list(demo.stream(Task(messages=[{"role": "user", "content": "tell me about apache"}],
                                   model="demo-fast"), Cancellation()))
    assert "mod_deflate" in texts(deltas)
    short = list(demo.stream(Task(messages=[{"role": "user", "content": "x"}], model="demo-fast", max_tokens=3),
                             Cancellation()))
    assert sum(isinstance(d, Text) for d in short) == 3
    assert [d.reason for d in short if isinstance(d, Finish)] == ["length"]


# ------------------------------------------------------------------ reasoning and signatures


def sent_body():
    return json.loads(responses.calls[-1].request.body)


@pytest.mark.parametrize("name,effort", [("openai", "medium"), ("groq", "medium"), ("openai-compatible", "medium"),
                                         ("mistral", "high")])
@responses.activate
def test_reasoning_effort_on_the_openai_format(name, effort):
    mock(name, BODIES[name](["x"]))
    run(provider(name), task(reasoning="medium"))
    assert sent_body()["reasoning_effort"] == effort
    mock(name, BODIES[name](["x"]))
    run(provider(name))
    assert "reasoning_effort" not in sent_body()


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@responses.activate
def test_openai_compatible_reasoning_streams_apart_with_its_token_count(field):
    mock("openai-compatible", openai_reasoning_body(["Let ", "me think."], ["Four", "."], field=field))
    deltas = run(provider("openai-compatible"), task(reasoning="low"))
    assert reasoning(deltas) == "Let me think." and texts(deltas) == "Four."
    assert [d.usage for d in deltas if isinstance(d, Usage)][-1]["reasoning_tokens"] == 2
    first_text = next(i for i, d in enumerate(deltas) if isinstance(d, Text))
    assert all(i < first_text for i, d in enumerate(deltas) if isinstance(d, Reasoning))


@responses.activate
def test_mistral_thinking_parts_are_reasoning():
    base = {"id": "1", "object": "chat.completion.chunk", "model": "m"}
    thinking = [{"type": "thinking", "thinking": [{"type": "text", "text": "Hmm, "}, {"type": "text", "text": "ok"}]}]
    frames = [sse({**base, "choices": [{"index": 0, "delta": {"content": thinking}}]}),
              sse({**base, "choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "Yes"}]}}]}),
              sse({**base, "choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
              b"data: [DONE]\n\n"]
    mock("mistral", frames)
    deltas = run(provider("mistral"))
    assert reasoning(deltas) == "Hmm, ok" and texts(deltas) == "Yes."


@responses.activate
def test_anthropic_thinking_request_budget_temperature_and_tool_choice():
    mock("anthropic", BODIES["anthropic"](["x"]))
    run(provider("anthropic"), task(reasoning="medium", temperature=0.2, max_tokens=100,
                                    tools=[{"name": "f", "parameters": {"type": "object"}}], tool_choice="f"))
    body = sent_body()
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert body["max_tokens"] == 4096 + 100  # the answer keeps its 100 tokens above the budget
    assert "temperature" not in body  # only 1 is allowed with thinking on
    assert body["tool_choice"] == {"type": "auto"}  # a forced tool is refused with thinking on
    mock("anthropic", BODIES["anthropic"](["x"]))
    run(provider("anthropic"), task(temperature=0.2, tools=[{"name": "f"}], tool_choice="f"))
    body = sent_body()
    assert "thinking" not in body and body["temperature"] == 0.2
    assert body["tool_choice"] == {"type": "tool", "name": "f"}


@responses.activate
def test_anthropic_thinking_streams_as_reasoning_and_its_blocks_are_kept_exactly():
    mock("anthropic", anthropic_thinking_body(["Six ", "sevens."], tool=("tu_1", "calc", '{"e": "6*7"}'),
                                              redacted="EmwKAhgBEgy3va"))
    deltas = run(provider("anthropic"), task(reasoning="low"))
    assert reasoning(deltas) == "Six sevens." and texts(deltas) == ""
    signed = [d for d in deltas if isinstance(d, Signed)]
    assert [(s.provider, s.item) for s in signed] == [
        ("anthropic", {"type": "thinking", "thinking": "Six sevens.", "signature": thinking_signature("Six sevens.")}),
        ("anthropic", {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va"})]
    kinds = [type(d).__name__ for d in deltas if isinstance(d, Reasoning | Signed | ToolCall)]
    assert kinds.index("Signed") < kinds.index("ToolCall")


@responses.activate
def test_anthropic_sends_its_own_thinking_blocks_first_and_drops_others():
    thinking = {"type": "thinking", "thinking": "t", "signature": "s"}
    turn = {"role": "assistant", "content": "Let me see.", "reasoning": "t",
            "signed": [{"provider": "anthropic", "item": thinking},
                       {"provider": "gemini", "item": {"thoughtSignature": "g"}}],
            "tool_calls": [{"id": "tu_1", "name": "calc", "arguments": "{}"}]}
    messages = [{"role": "user", "content": "q"}, turn,
                {"role": "tool", "tool_call_id": "tu_1", "name": "calc", "content": "42"}]
    mock("anthropic", BODIES["anthropic"](["x"]))
    run(provider("anthropic"), Task(messages=messages, model="m", reasoning="high"))
    assert [b["type"] for b in sent_body()["messages"][1]["content"]] == ["thinking", "text", "tool_use"]
    assert sent_body()["messages"][1]["content"][0] == thinking
    mock("anthropic", BODIES["anthropic"](["x"]))
    run(provider("anthropic"), Task(messages=messages, model="m"))  # thinking off: no thinking blocks
    assert [b["type"] for b in sent_body()["messages"][1]["content"]] == ["text", "tool_use"]


@pytest.mark.parametrize("model,config", [
    ("gemini-2.5-flash", {"includeThoughts": True, "thinkingBudget": 8192}),
    ("gemini-3-flash-preview", {"includeThoughts": True, "thinkingLevel": "medium"}),
    ("gemini-3-pro-preview", {"includeThoughts": True, "thinkingLevel": "high"}),
])
@responses.activate
def test_gemini_thinking_config_by_model(model, config):
    url = f"{BASE}/models/{model}:streamGenerateContent?alt=sse"
    responses.add(responses.POST, url, body=b"".join(BODIES["gemini"](["x"])), content_type="text/event-stream")
    run(provider("gemini"), Task(messages=[{"role": "user", "content": "q"}], model=model, reasoning="medium"))
    assert sent_body()["generationConfig"] == {"thinkingConfig": config}


@responses.activate
def test_gemini_thoughts_signatures_and_thought_tokens():
    mock("gemini", gemini_thinking_body(["Think", "ing."], ["Calling."], call=("calc", {"e": "1"})))
    deltas = run(provider("gemini"), task(reasoning="low"))
    assert reasoning(deltas) == "Thinking." and texts(deltas) == "Calling."
    call = next(d for d in deltas if isinstance(d, ToolCall))
    assert call.signature == {"provider": "gemini", "value": thought_signature("calc")}
    usage = [d.usage for d in deltas if isinstance(d, Usage)][-1]
    assert usage["reasoning_tokens"] == 30 and usage["output_tokens"] == 32
    mock("gemini", gemini_thinking_body([], ["Done."]))
    deltas = run(provider("gemini"))
    assert [(d.provider, d.item) for d in deltas if isinstance(d, Signed)] == [
        ("gemini", {"thoughtSignature": thought_signature("answer")})]


@responses.activate
def test_gemini_sends_its_own_signatures_back_on_the_same_parts():
    turn = {"role": "assistant", "content": "Calling.",
            "signed": [{"provider": "gemini", "item": {"thoughtSignature": "text-sig"}},
                       {"provider": "anthropic", "item": {"type": "thinking", "thinking": "x", "signature": "y"}}],
            "tool_calls": [{"id": "c1", "name": "calc", "arguments": "{}",
                            "signature": {"provider": "gemini", "value": "call-sig"}},
                           {"id": "c2", "name": "now", "arguments": "{}",
                            "signature": {"provider": "other-gemini", "value": "not-ours"}}]}
    messages = [{"role": "user", "content": "q"}, turn,
                {"role": "tool", "tool_call_id": "c1", "name": "calc", "content": "1"},
                {"role": "tool", "tool_call_id": "c2", "name": "now", "content": "2"}]
    mock("gemini", BODIES["gemini"](["x"]))
    run(provider("gemini"), Task(messages=messages, model="m"))
    assert sent_body()["contents"][1] == {"role": "model", "parts": [
        {"text": "Calling.", "thoughtSignature": "text-sig"},
        {"functionCall": {"name": "calc", "args": {}}, "thoughtSignature": "call-sig"},
        {"functionCall": {"name": "now", "args": {}}}]}


def test_demo_thinks_when_asked():
    demo = provider("demo")
    ask = [{"role": "user", "content": "hi"}]
    plain = list(demo.stream(Task(messages=ask, model="demo-fast"), Cancellation()))
    assert not any(isinstance(d, Reasoning) for d in plain)
    deltas = list(demo.stream(Task(messages=ask, model="demo-fast", reasoning="high"), Cancellation()))
    first_text = next(i for i, d in enumerate(deltas) if isinstance(d, Text))
    thoughts = [i for i, d in enumerate(deltas) if isinstance(d, Reasoning)]
    assert len(thoughts) > 3 and max(thoughts) < first_text
    assert texts(deltas) == texts(plain)  # the thinking is never part of the answer


@responses.activate
def test_anthropic_input_tokens_count_the_cached_part_too():
    """With prompt caching, Anthropic splits the input: `input_tokens` is only what follows the
    last cache breakpoint; the whole input is it plus `cache_read_input_tokens` and
    `cache_creation_input_tokens` (llama.cpp's /v1/messages reported a 13-token prompt as 5)."""
    usage = {"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 8, "output_tokens": 1}
    frames = [
        sse({"type": "message_start", "message": {"usage": usage}}, "message_start"),
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
            "content_block_delta"),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
            "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]
    mock("anthropic", frames)
    usages = [d.usage for d in run(provider("anthropic")) if isinstance(d, Usage)]
    assert usages[-1]["input_tokens"] == 113 and usages[-1]["output_tokens"] == 2
    assert usages[-1]["total_tokens"] == 115
