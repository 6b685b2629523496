"""Anthropic's Messages API: `POST /v1/messages`.

Code written for the official `anthropic` SDKs (and the tools built on them) uses the relay by
changing its base URL to the relay's and its API key to a relay token (sent as
`Authorization: Bearer`, or `x-api-key`); provider keys stay here. The request goes through
the same front door as every other route (auth, limits, records, the upstream closed when the
reader leaves, failover), to whichever provider the model names (`provider/model`, an alias,
or a bare model of the default provider, as on /v1/chat/completions). The stream is
Anthropic's named events with `event: ping` heartbeats; errors have Anthropic's shape and
statuses (app/errors.py). Details: docs/anthropic-api.md.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, Response, g, request

from app import images
from app.chat_request import ChatRequest, check_image_urls, invalid, message_list, new_turn, number_option
from app.config import Settings
from app.errors import ApiError
from app.openai_api import MAX_TOOLS, TOOL_NAME, resolve_model
from app.protocols import AnthropicEvents, anthropic_stop_reason, anthropic_usage
from app.providers.anthropic import AnthropicProvider
from app.providers.domain import Provider, Task, parsed_arguments
from app.request_body import parse_json_object
from app.routes import chat_service
from app.service import ChatService, Reading

bp = Blueprint("anthropic_messages", __name__)

# `metadata` and `cache_control` (a prompt caching mark, which changes what is billed, never
# the answer) are accepted and not forwarded; anything else not listed is refused.
KNOWN = {"model", "max_tokens", "system", "messages", "tools", "tool_choice", "stop_sequences", "temperature",
         "thinking", "output_config", "stream", "metadata", "cache_control"}
# What Anthropic accepts; every provider the relay speaks to takes these.
# The most stop sequences every provider accepts (OpenAI's chat API takes 4).
MAX_STOP_SEQUENCES = 4
# Anthropic's smallest thinking budget; the effort levels are the inverse of the usual
# effort -> budget mapping of gateways (low 1024, medium 2048, high 4096 tokens), so a
# budget that came from an effort maps back to it.
MIN_THINKING_BUDGET = 1024
EFFORT_BUDGETS = ((2048, "low"), (4096, "medium"))
# `output_config.effort` of current Anthropic models; the neutral scale stops at high.
OUTPUT_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


# ------------------------------------------------------------------ content blocks


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise invalid(f"{where}.content must be a string or a non-empty list of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid(f"{where}.content[{i}] must be a content block with a 'type'")
    return content


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid(f"{where}.text must be a string")
    return text


def image_part(block: dict[str, Any], where: str, max_bytes: int) -> dict[str, str]:
    """An image block as the neutral image part, checked by app/images.py: base64 data that is
    the PNG, JPEG, GIF or WebP it claims, or an https URL (which the relay never fetches)."""
    source = block.get("source")
    if not isinstance(source, dict):
        source = {}
    kind = source.get("type")
    if kind == "base64":
        return images.base64_part(source.get("media_type"), source.get("data"), f"{where}.source", max_bytes)
    if kind == "url":
        return images.url_part(source.get("url"), f"{where}.source.url", max_bytes)
    raise invalid(f"{where}.source must be {{type: base64, media_type, data}} or {{type: url, url}}")


def _result_text(content: Any, where: str) -> str:
    """A tool_result's content: a string, or text blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(_blocks(content, where)):
        if block["type"] != "text":
            raise invalid(f"{where}.content[{i}]: a tool result takes text blocks only")
        texts.append(_text(block, f"{where}.content[{i}]"))
    return "\n\n".join(texts)


def _user_turn(content: Any, where: str, names: dict[str, str], max_image_bytes: int) -> list[dict[str, Any]]:
    """A user message: its tool results (neutral `tool` messages, first, as Anthropic orders
    them), then what the user said, if anything."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, str]] = []
    for i, block in enumerate(_blocks(content, where)):
        at = f"{where}.content[{i}]"
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(image_part(block, at, max_image_bytes))
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise invalid(f"{at}.tool_use_id must be the id of a tool_use block of an earlier assistant message")
            result: dict[str, Any] = {"role": "tool", "tool_call_id": call_id, "name": names[call_id],
                                      "content": _result_text(block.get("content"), at)}
            if block.get("is_error"):
                result["is_error"] = True
            results.append(result)
        else:
            raise invalid(f"{at}: a user message takes text, image and tool_result blocks (got {kind[:40]!r})")
    if parts:
        results.append({"role": "user", "content": images.neutral_content(parts)})
    return results


def _assistant_turn(content: Any, where: str, names: dict[str, str], signer: str | None) -> dict[str, Any]:
    """An assistant message: its text, tool calls, visible thinking, and (`signer`, the name of
    the Anthropic provider this request goes to) the signed thinking blocks it must get back."""
    texts: list[str] = []
    calls: list[dict[str, str]] = []
    thoughts: list[str] = []
    signed: list[dict[str, Any]] = []
    for i, block in enumerate(_blocks(content, where)):
        at = f"{where}.content[{i}]"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) \
                    or not isinstance(arguments, dict):
                raise invalid(f"{at} must be {{type: tool_use, id, name, input: {{…}}}}")
            try:
                calls.append({"id": call_id, "name": name,
                              "arguments": json.dumps(arguments, ensure_ascii=False, allow_nan=False)})
            except ValueError:  # NaN or Infinity: no provider takes them as JSON
                raise invalid(f"{at}.input must be plain JSON (no NaN or Infinity)") from None
            names[call_id] = name
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise invalid(f"{at}.thinking must be a string")
            thoughts.append(block["thinking"])
            if signer and isinstance(block.get("signature"), str) and block["signature"]:
                signed.append({"provider": signer, "item": {"type": "thinking", "thinking": block["thinking"],
                                                            "signature": block["signature"]}})
        elif kind == "redacted_thinking":
            if not isinstance(block.get("data"), str):
                raise invalid(f"{at}.data must be a string")
            if signer:
                signed.append({"provider": signer, "item": {"type": "redacted_thinking", "data": block["data"]}})
        else:
            raise invalid(f"{at}: an assistant message takes text, tool_use and thinking blocks (got {kind[:40]!r})")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    if thoughts:
        message["reasoning"] = "".join(thoughts)
    if signed:
        message["signed"] = signed
    return message


def neutral_messages(value: Any, settings: Settings, signer: str | None) -> list[dict[str, Any]]:
    """Anthropic messages as the relay's provider-neutral messages (app/providers/domain.py `Task`)."""
    value = message_list(value, settings, "{role, content}")
    messages: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role == "user":
            messages += _user_turn(m.get("content"), where, names, settings.MAX_IMAGE_BYTES)
        elif role == "assistant":
            messages.append(_assistant_turn(m.get("content"), where, names, signer))
        else:
            raise invalid(f"{where}.role must be user or assistant")
    if value[-1].get("role") != "user":
        raise invalid("the last message must be from the user (continuing an assistant message is not supported)")
    return messages


def system_prompt(value: Any) -> str | None:
    """`system` as text: a string, or text blocks."""
    if value is None or isinstance(value, str):
        return value or None
    if not isinstance(value, list):
        raise invalid("'system' must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise invalid(f"system[{i}] must be a text block")
        texts.append(_text(block, f"system[{i}]"))
    return "\n\n".join(texts) or None


# ------------------------------------------------------------------ options


def client_tools(value: Any) -> list[dict[str, Any]]:
    """Client tools `{name, description?, input_schema}` as the neutral `{name, description, parameters}`."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_TOOLS} tools")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            raise invalid(f"tools[{i}]: only client tools {{name, description, input_schema}} are supported")
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description", "")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"tools[{i}].name must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(schema, dict):
            raise invalid(f"tools[{i}].input_schema must be a JSON schema object")
        if not isinstance(description, str):
            raise invalid(f"tools[{i}].description must be a string")
        tools.append({"name": name, "description": description, "parameters": schema})
    return tools


def tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | None:
    """`{type: auto|any|tool|none}` as the neutral "auto", "required", a tool's name, or "none"."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("disable_parallel_tool_use"):
        raise invalid("'tool_choice.disable_parallel_tool_use' is not supported")
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any" and tools:
        return "required"
    name = value.get("name") if kind == "tool" else None
    if isinstance(name, str) and name in {t["name"] for t in tools}:
        return name
    raise invalid("'tool_choice' must be {type: auto}, {type: any}, {type: none} or {type: tool, name} "
                  "naming one of the tools")


def effort_of(thinking: Any, max_tokens: int, output_config: Any = None) -> str | None:
    """`thinking` (and the newer `output_config.effort`) as the neutral reasoning effort
    (`Task.reasoning`): a manual thinking budget by its size; adaptive thinking (the model
    decides) as medium unless an effort is given."""
    if output_config is not None:
        if not isinstance(output_config, dict) or set(output_config) - {"effort"} \
                or not isinstance(output_config.get("effort"), str) or output_config["effort"] not in OUTPUT_EFFORTS:
            raise invalid(f"'output_config' must be {{effort}} with effort one of {', '.join(OUTPUT_EFFORTS)}")
        effort = OUTPUT_EFFORTS[output_config["effort"]]
    else:
        effort = None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if thinking is None or kind == "disabled":
        return effort
    if isinstance(thinking, dict) and thinking.get("display", "summarized") not in ("summarized", "omitted", None):
        raise invalid("'thinking.display' must be summarized or omitted")
    if kind == "adaptive":
        return effort or "medium"
    budget = thinking.get("budget_tokens") if kind == "enabled" else None
    if isinstance(budget, bool) or not isinstance(budget, int) or not MIN_THINKING_BUDGET <= budget < max_tokens:
        raise invalid(f"'thinking' must be {{type: disabled}}, {{type: adaptive}} or {{type: enabled, budget_tokens}} "
                      f"with budget_tokens at least {MIN_THINKING_BUDGET} and less than max_tokens")
    return effort or next((level for below, level in EFFORT_BUDGETS if budget < below), "high")


def stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_STOP_SEQUENCES \
            or not all(isinstance(s, str) and s for s in value):
        raise invalid(f"'stop_sequences' must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings")
    return value


def parse_messages_request(data: dict[str, Any], service: ChatService) -> tuple[ChatRequest, bool]:
    """An Anthropic Messages request as the relay's request, and whether to stream it."""
    settings = service.settings
    unknown = set(data) - KNOWN
    if unknown:
        raise invalid(f"unsupported parameter(s): {', '.join(sorted(unknown))[:200]}")
    provider, model = resolve_model(data.get("model"), service.providers, settings)
    if "max_tokens" not in data:
        raise invalid("'max_tokens' is required")
    max_tokens = int(number_option(data["max_tokens"], "max_tokens", 1, settings.MAX_OUTPUT_TOKENS, True, False))
    system = system_prompt(data.get("system"))
    messages = neutral_messages(data.get("messages"), settings, _signer(provider))
    check_image_urls(messages, provider)  # sizes: the one budget (app/budget.py), in ChatService
    tools = client_tools(data.get("tools"))
    temperature = data.get("temperature")
    if temperature is not None:
        temperature = float(number_option(temperature, "temperature", 0, 1, False, False))
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean")
    if not isinstance(data.get("metadata", {}), dict):
        raise invalid("'metadata' must be an object")
    task = Task(messages=messages, model=model, system=system, temperature=temperature, max_tokens=max_tokens,
                tools=tools, tool_choice=tool_choice(data.get("tool_choice"), tools),
                stop=stop_sequences(data.get("stop_sequences")),
                reasoning=effort_of(data.get("thinking"), max_tokens, data.get("output_config")))
    # The client resends the whole history each turn and is given no conversation id: nothing is
    # kept (as on /v1/chat/completions without `store`; docs/anthropic-api.md).
    return ChatRequest(provider, task, None, [], records=new_turn(messages), keep_record=False), stream


def _signer(provider: Provider) -> str | None:
    """The provider that may get signed thinking back: only an Anthropic one (a signature is
    Anthropic's own; any other provider would be sent a forgery)."""
    return provider.name if isinstance(provider, AnthropicProvider) else None


# ------------------------------------------------------------------ the route


def message_object(message_id: str, model: str, answer: Any) -> dict[str, Any]:
    """A whole answer as Anthropic's Message object."""
    content: list[dict[str, Any]] = []
    if answer.text:
        content.append({"type": "text", "text": answer.text})
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": parsed_arguments(c.arguments)}
                for c in answer.tool_calls]
    return {"id": message_id, "type": "message", "role": "assistant", "content": content, "model": model,
            "stop_reason": anthropic_stop_reason(answer.finish_reason), "stop_sequence": None,
            "usage": anthropic_usage(answer.usage)}


def await_first_outcome(reading: Reading, within: float) -> None:
    """Hold a stream's response until the provider sent content or failed, for at most `within`
    seconds (one heartbeat: an idle upstream still gets its pings after that). Anthropic answers
    a request it refuses (a rate limit, an overload) with an HTTP status before any stream, and
    its SDKs pick their exception class by that status; so does the route, whenever the failure
    comes in time. Nothing is consumed: the response reads the log from its start."""
    log, deadline = reading.log, time.monotonic() + within
    # Past message_start, the one frame of the opening (written when a driven log is first read).
    # A log detached by a draining worker answers every wait at once: nothing to wait for then.
    while not log.closed and not log.detached and not log.wait(1, max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            return


@bp.post("/v1/messages")
def messages() -> Response | dict[str, Any]:
    service = chat_service()
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    service.admit(g.caller)
    data = parse_json_object(request.get_data(cache=False))
    chat, stream = parse_messages_request(data, service)
    if stream:
        wire = AnthropicEvents(data["model"])
        reading = service.stream(g.caller, chat, wire=wire, transport="anthropic")
        await_first_outcome(reading, service.settings.SSE_HEARTBEAT_SECONDS)
        if wire.failed_early is not None:
            if reading.on_close is not None:
                reading.on_close(True)
            status, message = wire.failed_early
            raise ApiError(status, "upstream_error", message)
        return service.sse(reading, retry=False, keepalive=AnthropicEvents.KEEPALIVE)
    # A ProviderError is answered by the app's handler (app/errors.py), in Anthropic's statuses.
    request_id, _, answer = service.answer(g.caller, chat, transport="anthropic")
    return message_object(f"msg_{request_id}", data["model"], answer)
