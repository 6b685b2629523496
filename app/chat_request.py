"""Validation of chat options (query string or JSON) into a provider and a `Task`.

Every rule raises `ApiError` with a message that names the field, so bad input is a
clear 4xx and never reaches a provider.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app import images
from app.config import Settings
from app.errors import ApiError
from app.providers import Provider, Task
from app.request_body import parse_json
from app.tools import Tool, Toolbox

OPTIONS = {"prompt", "messages", "system", "provider", "model", "temperature", "max_tokens", "conversation_id",
           "tools", "reasoning"}
REASONING_LEVELS = ("low", "medium", "high")
ROLES = {"system", "user", "assistant"}
# fullmatch, never match() with "$": "$" also matches before a trailing newline.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
MODEL_PATTERN = re.compile(r"[A-Za-z0-9_.:/@+-]{1,200}")


@dataclass
class ChatRequest:
    provider: Provider
    task: Task
    conversation_id: str | None
    tools: list[Tool]  # server-side tools to run (app.tools); client-defined tools live in task.tools
    # What the conversation record keeps of this request (default: all of task.messages). A
    # client that resends the whole history each turn (the OpenAI API) stores only its new turn.
    records: list[dict[str, Any]] | None = None
    # False: nothing of this request or its answer is stored (routes whose clients resend the
    # whole history each turn, unless they ask for a record: docs/openai-api.md).
    keep_record: bool = True


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string")
    if len(value) > limit:
        raise ApiError(413, "prompt_too_large", f"'{name}' is longer than {limit} characters")
    return value


def number_option(value: Any, name: str, low: float, high: float, integer: bool, from_query: bool) -> float | int:
    if from_query and isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise invalid(f"'{name}' must be a {'whole number' if integer else 'number'}") from None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise invalid(f"'{name}' must be a {'whole number' if integer else 'number'}")
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid(f"'{name}' must be between {low:g} and {high:g}")
    number: float | int = value  # a number within bounds, as checked above
    return number


def message_list(value: Any, settings: Settings, shape: str) -> list[Any]:
    """A request's list of messages, whatever their format: non-empty, at most MAX_MESSAGES before
    it is even parsed (app/budget.py counts again what the translation made of it)."""
    if not isinstance(value, list) or not value:
        raise invalid(f"'messages' must be a non-empty list of {shape}")
    if len(value) > settings.MAX_MESSAGES:
        raise ApiError(413, "prompt_too_large", f"'messages' has more than {settings.MAX_MESSAGES} entries")
    return value


def keep_record(data: dict[str, Any]) -> bool:
    """`store: true` keeps a conversation record of the request and its answer; by default a
    client that resends the whole history each turn gets none (docs/openai-api.md, docs/ai-sdk.md)."""
    store = data.get("store")
    if store is not None and not isinstance(store, bool):
        raise invalid("'store' must be a boolean")
    return bool(store)


def new_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a record keeps of a request that resends the whole history: what followed the last
    assistant message."""
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[last_answer + 1:]


def parse_messages(value: Any, settings: Settings) -> list[dict[str, Any]]:
    """`[{role, content}]`; a user message's content may also be OpenAI-style parts (text and
    `image_url`), checked by app/images.py."""
    value = message_list(value, settings, "{role, content}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise invalid(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {sorted(ROLES)}")
        if role == "user" and isinstance(content, list):
            content = images.openai_content(content, f"messages[{i}]", settings.MAX_IMAGE_BYTES)
        elif not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string"
                          + (" or a list of text and image_url parts" if role == "user" else ""))
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user" or not has_content(messages[-1]["content"]):
        raise invalid("the last message must be a non-empty 'user' message")
    return messages


def check_image_urls(messages: list[dict[str, Any]], provider: Provider) -> None:
    """Images in a form the provider takes: the relay never fetches an image URL on a provider's
    behalf. (How many and how large: the one budget, app/budget.py.)"""
    if not provider.takes_image_urls and any(part.get("url") for part in images.images_in(messages)):
        raise invalid(f"provider '{provider.name}' takes images as data: URLs only, not by web URL")


def has_content(content: Any) -> bool:
    """Whether a message says anything: some text that is not blank, or an image."""
    return bool(images.text_of(content).strip()) or any(images.images_in([{"content": content}]))


def parse_chat_request(data: Mapping[str, Any], settings: Settings, providers: Mapping[str, Provider],
                       toolbox: Toolbox, from_query: bool = False, messages: list[dict[str, Any]] | None = None,
                       records: list[dict[str, Any]] | None = None, keep_record: bool = True) -> ChatRequest:
    """Validate the options of one chat request (docs/http-api.md: request options); `toolbox`
    holds the app's tools that `tools` may name.

    `messages`, when given, are already in the neutral form (a transport with its own message
    format parsed them); then `prompt` and `messages` must not be among the options. `records`
    and `keep_record`: what of the request its conversation keeps (see `ChatRequest`).
    """
    unknown = set(data) - OPTIONS
    if unknown:
        raise invalid(f"unknown option(s): {', '.join(sorted(unknown))}")
    limit = settings.MAX_PROMPT_CHARS

    name = data.get("provider") or settings.LLM_PROVIDER
    if not isinstance(name, str):
        raise invalid("'provider' must be a string")
    provider = providers.get(name)
    if provider is None:
        known = ", ".join(sorted(providers))
        raise ApiError(400, "unknown_provider", f"unknown provider '{name[:50]}'; known: {known}")
    if not provider.configured:
        raise ApiError(400, "provider_not_configured", f"provider '{name}' has no API key configured on this server")

    if messages is not None:
        if "messages" in data or "prompt" in data:
            raise invalid("unexpected 'prompt' or 'messages' option")
    elif "messages" in data and "prompt" in data:
        raise invalid("send either 'prompt' or 'messages', not both")
    elif "messages" in data:
        raw = data["messages"]
        if from_query:
            if not isinstance(raw, str):
                raise invalid("'messages' must be a JSON list")
            raw = parse_json(raw, "'messages'")
        messages = parse_messages(raw, settings)
    elif "prompt" in data:
        prompt = _text(data["prompt"], "prompt", limit)
        if not prompt.strip():
            raise invalid("'prompt' must not be empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        raise invalid("'prompt' or 'messages' is required")

    system = data.get("system")
    if system is not None:
        system = _text(system, "system", limit) or None

    model = data.get("model") or provider.default_model
    if not isinstance(model, str) or not MODEL_PATTERN.fullmatch(model):
        raise invalid("'model' must be a model name (letters, digits and ._:/@+-)")
    temperature = data.get("temperature")
    if temperature is not None and temperature != "":
        temperature = float(number_option(temperature, "temperature", 0, 2, False, from_query))
    else:
        temperature = None
    max_tokens = data.get("max_tokens")
    if max_tokens is not None and max_tokens != "":
        max_tokens = int(number_option(max_tokens, "max_tokens", 1, settings.MAX_OUTPUT_TOKENS, True, from_query))
    else:
        max_tokens = None
    conversation_id = data.get("conversation_id") or None
    if conversation_id is not None and not (isinstance(conversation_id, str) and ID_PATTERN.fullmatch(conversation_id)):
        raise invalid("'conversation_id' must be 1-64 characters of letters, digits, '_' or '-'")

    check_image_urls(messages, provider)
    tools = parse_tools(data.get("tools"), toolbox)
    task = Task(messages=messages, model=model, system=system, temperature=temperature, max_tokens=max_tokens,
                reasoning=reasoning_option(data.get("reasoning")))
    return ChatRequest(provider, task, conversation_id, tools, records, keep_record)


def reasoning_option(value: Any) -> str | None:
    """The requested reasoning level: "low", "medium" or "high"; absent or empty for the
    provider's default (usually no visible reasoning)."""
    if value is None or value == "":
        return None
    if value not in REASONING_LEVELS:
        raise invalid("'reasoning' must be one of low, medium, high")
    return str(value)


def parse_tools(value: Any, toolbox: Toolbox) -> list[Tool]:
    """`true` for every registered tool, or a list of their names; absent/false for none."""
    if value is None or value is False or value == "false" or value == "":
        return []
    if value is True or value == "true":
        return toolbox.select(True)
    if isinstance(value, str):  # query string: comma-separated names
        value = [name for name in value.split(",") if name]
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise invalid("'tools' must be true or a list of tool names")
    unknown = [n for n in value if n not in toolbox.tools]
    if unknown:
        raise invalid(f"unknown tool(s): {', '.join(n[:64] for n in unknown)}; known: {', '.join(toolbox.tools)}")
    return toolbox.select(value)
