"""The OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.

Apps written for the official OpenAI SDKs use the relay by changing only their base URL
(`http://host/v1`) and using a relay token as the API key; provider keys stay here. The
request goes through the same front door as every other route (auth, limits, records,
the upstream closed when the reader leaves, heartbeats as SSE comments), to whichever
provider the model names: `provider/model`, a bare model of the default provider, or an
alias from `MODEL_ALIASES`. Tools the client defines pass through to any provider and
come back as OpenAI `tool_calls`. Details: docs/openai-api.md.
"""

from __future__ import annotations

import re
import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from app import images
from app.chat_request import (
    MODEL_PATTERN,
    ChatRequest,
    check_image_urls,
    invalid,
    keep_record,
    message_list,
    new_turn,
    number_option,
)
from app.config import Settings
from app.errors import ApiError
from app.protocols import THINKING_BLOCKS, OpenAIChunks, openai_finish, openai_tool_call, openai_usage, thinking_blocks
from app.providers import Provider
from app.providers.anthropic import AnthropicProvider
from app.providers.domain import Task
from app.request_body import parse_json_object
from app.routes import chat_service
from app.service import ChatService

bp = Blueprint("openai", __name__)

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128
# Options that only shape sampling details the relay does not forward; accepted so SDK
# defaults and common client code work unchanged.
IGNORED = {"user", "metadata", "parallel_tool_calls", "top_p", "presence_penalty", "frequency_penalty",
           "seed", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity"}
KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
         "stop", "n", "tools", "tool_choice", "logprobs", "response_format", "reasoning_effort", "store"} | IGNORED
# OpenAI's reasoning_effort values as the relay's reasoning levels ("none": no visible reasoning).
REASONING_EFFORTS = {"none": None, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                     "xhigh": "high"}


# ------------------------------------------------------------------ models


def parse_aliases(text: str) -> dict[str, str]:
    """MODEL_ALIASES "fast=groq/llama-3.1-8b-instant,smart=anthropic/claude-sonnet-4-5"."""
    aliases = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, target = item.partition("=")
        if not name.strip() or "/" not in target:
            raise ValueError(f"MODEL_ALIASES: {item!r} is not name=provider/model")
        aliases[name.strip()] = target.strip()
    return aliases


def resolve_model(name: Any, providers: dict[str, Provider], settings: Settings) -> tuple[Provider, str]:
    """`provider/model`, an alias, or a bare model of the default provider."""
    if not isinstance(name, str) or not MODEL_PATTERN.fullmatch(name):
        raise invalid("'model' must be a model name such as 'openai/gpt-4.1-mini' or an alias")
    target = parse_aliases(settings.MODEL_ALIASES).get(name, name)
    prefix, _, model = target.partition("/")
    provider = providers.get(prefix) if model else None
    if provider is None:  # a bare name ("gpt-4.1", or a vLLM "org/model"): the default provider
        provider, model = providers.get(settings.LLM_PROVIDER), target
    if provider is None or not provider.configured:
        raise ApiError(404, "model_not_found", f"the model '{name[:100]}' is not available on this server")
    return provider, model


def model_list(providers: dict[str, Provider], settings: Settings) -> list[dict[str, Any]]:
    seen, out = set(), []
    names = [f"{n}/{m}" for n, p in providers.items() if p.configured for m in p.models]
    names += [a for a, target in parse_aliases(settings.MODEL_ALIASES).items()
              if providers.get(target.partition("/")[0]) is not None]
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append({"id": name, "object": "model", "created": 0, "owned_by": name.partition("/")[0] or "relay"})
    return out


# ------------------------------------------------------------------ requests


def _text_of(content: Any, where: str) -> str:
    """A system, assistant or tool message's content as text: a string, or text parts."""
    text = images.openai_content(content, where, 0, images=False)
    assert isinstance(text, str)  # text parts only
    return text


def _tool_calls(value: Any, where: str, provider: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid(f"{where}.tool_calls must be a list")
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str) \
                or not isinstance(function.get("name"), str) or not isinstance(function.get("arguments", ""), str):
            raise invalid(f"{where}.tool_calls[{i}] must be {{id, type: function, function: {{name, arguments}}}}")
        neutral = {"id": call["id"], "name": function["name"], "arguments": function.get("arguments") or "{}"}
        extra = call.get("extra_content")
        signature = ((extra.get("google") or {}) if isinstance(extra, dict) else {}).get("thought_signature")
        if isinstance(signature, str) and signature:  # sent back as it came (see protocols.openai_tool_call)
            neutral["signature"] = {"provider": provider, "value": signature}
        calls.append(neutral)
    return calls


def _thinking_blocks(value: Any, where: str, signer: str | None) -> list[dict[str, Any]]:
    """An assistant message's `thinking_blocks` (see protocols.thinking_blocks): Anthropic's
    blocks, so signed items of `signer`, the Anthropic provider the request goes to (none for
    any other: it would be sent a forgery), with the block's own fields only."""
    if not isinstance(value, list) or not all(isinstance(b, dict) and b.get("type") in THINKING_BLOCKS
                                              for b in value):
        raise invalid(f"{where}.thinking_blocks must be a list of thinking or redacted_thinking blocks")
    fields = {"thinking": ("thinking", "signature"), "redacted_thinking": ("data",)}
    blocks = [{"type": b["type"], **{k: b.get(k) for k in fields[b["type"]]}} for b in value]
    if not all(isinstance(v, str) for b in blocks for v in b.values()):
        raise invalid(f"{where}.thinking_blocks: thinking needs 'thinking' and 'signature', redacted_thinking "
                      f"'data' (strings)")
    return [{"provider": signer, "item": block} for block in blocks] if signer else []


def thinking_signer(provider: Provider) -> str | None:
    """The provider that may get signed thinking blocks back: only an Anthropic one."""
    return provider.name if isinstance(provider, AnthropicProvider) else None


def neutral_messages(value: Any, settings: Settings, provider: str = "", signer: str | None = None
                     ) -> list[dict[str, Any]]:
    """OpenAI chat messages as the relay's provider-neutral messages (`provider`: the name of
    the provider they go to, whose reasoning state the client may send back; `signer`: that
    provider's name if it is one that takes Anthropic thinking blocks, see `thinking_signer`)."""
    value = message_list(value, settings, "chat messages")
    messages: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            messages.append({"role": "system", "content": _text_of(m.get("content"), where)})
        elif role == "user":
            messages.append({"role": "user", "content": images.openai_content(m.get("content"), where,
                                                                               settings.MAX_IMAGE_BYTES)})
        elif role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": _text_of(m.get("content"), where)}
            if m.get("tool_calls"):
                message["tool_calls"] = _tool_calls(m["tool_calls"], where, provider)
                names.update((c["id"], c["name"]) for c in message["tool_calls"])
            signed = _thinking_blocks(m["thinking_blocks"], where, signer) if m.get("thinking_blocks") else []
            if signed:
                message["signed"] = signed
            messages.append(message)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{where}.tool_call_id must be the id of an earlier tool call")
            messages.append({"role": "tool", "tool_call_id": call_id, "name": names.get(call_id, ""),
                             "content": _text_of(m.get("content"), where)})
        else:
            raise invalid(f"{where}.role must be system, developer, user, assistant or tool")
    if messages[-1]["role"] not in ("user", "tool"):
        raise invalid("the last message must be from the user or a tool result")
    return messages



def client_tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_TOOLS} function tools")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not TOOL_NAME.fullmatch(function["name"]):
            raise invalid(f"tools[{i}] must be {{type: function, function: {{name, description?, parameters?}}}}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema object")
        tools.append({"name": function["name"], "description": str(function.get("description") or ""),
                      "parameters": parameters})
    return tools


def tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ("auto", "none", "required"):
        return value
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in {t["name"] for t in tools}:
        raise invalid("'tool_choice' must be auto, none, required or {type: function, function: {name}} "
                      "naming one of the tools")
    return name


def parse_completion_request(data: dict[str, Any], service: ChatService) -> tuple[ChatRequest, dict[str, Any]]:
    """An OpenAI chat completion request as the relay's request (and how to answer it)."""
    settings = service.settings
    unknown = set(data) - KNOWN
    if unknown:
        raise invalid(f"unsupported parameter(s): {', '.join(sorted(unknown))[:200]}")
    if data.get("n") not in (None, 1):
        raise invalid("only n=1 is supported")
    if data.get("logprobs"):
        raise invalid("logprobs are not supported")
    response_format = data.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid("only response_format {type: text} is supported")
    provider, model = resolve_model(data.get("model"), service.providers, settings)
    messages = neutral_messages(data.get("messages"), settings, provider.name, thinking_signer(provider))
    check_image_urls(messages, provider)
    tools = client_tools(data.get("tools"))
    temperature = data.get("temperature")
    if temperature is not None:
        temperature = float(number_option(temperature, "temperature", 0, 2, False, False))
    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    if limit is not None:
        limit = int(number_option(limit, "max_completion_tokens", 1, settings.MAX_OUTPUT_TOKENS, True, False))
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise invalid("'stop' must be a string or a list of at most 4 strings")
    stream = data.get("stream", False)
    options = data.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise invalid("'stream' must be a boolean and 'stream_options' an object")
    effort = data.get("reasoning_effort")
    if effort is not None and (not isinstance(effort, str) or effort not in REASONING_EFFORTS):
        raise invalid(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}")
    task = Task(messages=messages, model=model, temperature=temperature, max_tokens=limit, tools=tools,
                tool_choice=tool_choice(data.get("tool_choice"), tools), stop=stop,
                reasoning=REASONING_EFFORTS.get(effort) if effort else None)
    chat = ChatRequest(provider, task, None, [], records=new_turn(messages), keep_record=keep_record(data))
    return chat, {"stream": stream, "include_usage": bool(options.get("include_usage")), "model": data["model"]}


# ------------------------------------------------------------------ routes


@bp.get("/v1/models")
def models() -> Response:
    service = chat_service()
    return jsonify(object="list", data=model_list(service.providers, service.settings))


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    service = chat_service()
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    service.admit(g.caller)
    chat, how = parse_completion_request(parse_json_object(request.get_data(cache=False)), service)
    if how["stream"]:
        wire = OpenAIChunks(how["model"], how["include_usage"])
        reading = service.stream(g.caller, chat, wire=wire, transport="openai")
        return service.sse(reading, retry=False)
    request_id, _, answer = service.answer(g.caller, chat, transport="openai")  # ProviderError: app/errors.py
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.reasoning:  # where DeepSeek and LiteLLM put it
        message["reasoning_content"] = answer.reasoning_text
    if thinking_blocks(answer.signed):
        message["thinking_blocks"] = thinking_blocks(answer.signed)
    if answer.tool_calls:
        message["tool_calls"] = [openai_tool_call(c) for c in answer.tool_calls]
    return jsonify(id=f"chatcmpl-{request_id}", object="chat.completion", created=int(time.time()),
                   model=how["model"], choices=[{"index": 0, "message": message, "logprobs": None,
                                                 "finish_reason": openai_finish(answer.finish_reason)}],
                   usage=openai_usage(answer.usage) or openai_usage({}))
