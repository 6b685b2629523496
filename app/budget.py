"""The one budget every request is held to, counted on what goes upstream and into the store.

Each route translates its own format (the relay's options, OpenAI chat messages, AI SDK UI
messages, the Python API's builder) into the same `Task`; `ChatService` checks that `Task`
here before anything is stored or sent. Counting the translation, not a route's options,
is the point: one UI message of 6,000 tool parts is 6,000 items upstream, and a tool's
description or a stop string goes to the model as surely as the user's text.

What is counted (docs/configuration.md, "The budget of a request"):
- MAX_PROMPT_CHARS: the characters of message text (a string, or the text of each part),
  tool calls (id, name, arguments), tool results (id, name, content), reasoning and signed
  items kept with a turn, the system text and the stop strings;
- MAX_MESSAGES: messages, each tool call and each content part (each is an item upstream);
- MAX_TOOL_SCHEMA_CHARS: the tools the client defines, as JSON;
- MAX_TOOL_ID_CHARS and MAX_TOOL_NAME_CHARS: every tool call id and tool name;
- tool-call arguments nest at most `MAX_DEPTH` levels, like a request body: adapters parse
  them into objects, and a parser must never recurse without bound;
- image parts: MAX_IMAGES of them, their bytes within MAX_IMAGE_TOTAL_BYTES (app/images.py,
  which also checked each one when it came in), a URL's characters as prompt text.

The history a conversation replays is not counted here: it was counted when each turn was
accepted, and replay has its own budget (HISTORY_MAX_MESSAGES, HISTORY_MAX_CHARS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app import images
from app.config import Settings
from app.errors import ApiError
from app.json_depth import MAX_DEPTH, json_nesting
from app.providers.domain import Task


@dataclass
class Spend:
    """What a request costs, as counted so far."""

    chars: int = 0
    items: int = 0


def check_budget(task: Task, settings: Settings) -> None:
    """Refuse a request over any limit: 413 for sizes, 400 for an id, a name or arguments
    that no provider accepts. Content may be a string or a list of parts."""
    spend = Spend(chars=len(task.system or "") + sum(len(stop) for stop in task.stop))
    for message in task.messages:
        _count_message(message, spend, settings)
    if spend.items > settings.MAX_MESSAGES:
        raise ApiError(413, "prompt_too_large",
                       f"the request has {spend.items} messages, tool calls and content parts; the limit is "
                       f"{settings.MAX_MESSAGES}")
    if spend.chars > settings.MAX_PROMPT_CHARS:
        raise ApiError(413, "prompt_too_large",
                       f"the prompt is {spend.chars} characters (messages, tool calls and results, system text and "
                       f"stop strings); the limit is {settings.MAX_PROMPT_CHARS}")
    images.check_images(task.messages, settings.MAX_IMAGES, settings.MAX_IMAGE_TOTAL_BYTES)
    schemas = 0
    for tool in task.tools:
        _check_name(tool.get("name"), settings)
        schemas += len(tool["name"]) + len(tool.get("description") or "") + _json_chars(tool.get("parameters"))
    if schemas > settings.MAX_TOOL_SCHEMA_CHARS:
        raise ApiError(413, "prompt_too_large",
                       f"the tool definitions are {schemas} characters; the limit is {settings.MAX_TOOL_SCHEMA_CHARS}")


def _count_message(message: dict[str, Any], spend: Spend, settings: Settings) -> None:
    spend.items += 1
    _count_content(message.get("content"), spend)
    spend.chars += len(message.get("reasoning") or "")
    for item in message.get("signed") or ():
        spend.chars += _json_chars(item)
    for call in message.get("tool_calls") or ():
        spend.items += 1
        arguments = call.get("arguments") or ""
        if not isinstance(arguments, str):
            raise ApiError(400, "invalid_request", "a tool call's arguments must be JSON text")
        if json_nesting(arguments) > MAX_DEPTH:
            raise ApiError(400, "invalid_request", f"a tool call's arguments nest deeper than {MAX_DEPTH} levels")
        spend.chars += _check_id(call.get("id"), settings) + _check_name(call.get("name"), settings) + len(arguments)
        signature = call.get("signature")
        if signature:
            spend.chars += len(str(signature.get("value") or ""))
    if message.get("role") == "tool":
        spend.chars += _check_id(message.get("tool_call_id"), settings)
        if message.get("name"):
            spend.chars += _check_name(message["name"], settings)


def _count_content(content: Any, spend: Spend) -> None:
    """A string, or a list of parts (`Task`): text counts as prompt characters; an image's base64
    data is held to the image limits (`check_images`); a part of a kind not known here counts
    all of its JSON."""
    if content is None:
        return
    if isinstance(content, str):
        spend.chars += len(content)
        return
    for part in content:
        spend.items += 1
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            spend.chars += len(part.get("text") or "")
        elif kind == "image" and isinstance(part.get("data"), str):
            pass  # counted by images.check_images
        elif kind == "image" and isinstance(part.get("url"), str):
            spend.chars += len(part["url"])
        else:
            spend.chars += _json_chars(part)


def _check_id(value: Any, settings: Settings) -> int:
    return _bounded_name(value, settings.MAX_TOOL_ID_CHARS, "every tool call and tool result needs a string id",
                         "a tool call id")


def _check_name(value: Any, settings: Settings) -> int:
    return _bounded_name(value, settings.MAX_TOOL_NAME_CHARS, "every tool needs a name", "a tool name")


def _bounded_name(value: Any, limit: int, missing: str, what: str) -> int:
    """The length of a non-empty string of at most `limit` characters; a 400 otherwise."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_request", missing)
    if len(value) > limit:
        raise ApiError(400, "invalid_request", f"{what} is longer than {limit} characters")
    return len(value)


def _json_chars(value: Any) -> int:
    """Characters of `value` as JSON: what a schema or an opaque item adds to the request."""
    return len(json.dumps(value, ensure_ascii=False)) if value is not None else 0
