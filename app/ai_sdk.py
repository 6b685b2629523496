"""Vercel AI SDK UI message streams (`POST /api/chat/ui`), for `useChat` on a Flask backend.

`useChat` with its default transport posts `{id, messages, trigger, messageId, ...body}`,
with UI messages made of `parts`, and reads the UI message stream protocol. This route
accepts that request, adds the relay's own options from `body` (provider, model,
system, temperature, max_tokens, tools, reasoning), goes through the same front door as every
route, and answers with `app.protocols.UiMessageStream`. Details: docs/ai-sdk.md.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, request

from app import images
from app.chat_request import has_content, invalid, keep_record, message_list, new_turn, parse_chat_request
from app.config import Settings
from app.errors import ApiError
from app.protocols import UiMessageStream
from app.request_body import parse_json_object
from app.routes import chat_service

bp = Blueprint("ai_sdk", __name__)

# What the AI SDK's transport sends besides the messages; not relay options.
TRANSPORT_FIELDS = {"id", "messages", "trigger", "messageId", "store"}
IGNORED_PARTS = {"step-start", "reasoning", "source-url", "source-document"}


def _content(parts: list[Any], where: str, max_image_bytes: int | None) -> str | list[dict[str, Any]]:
    """A user or system message's content: its text, and for a user (`max_image_bytes` set) its
    image `file` parts (a data: or https URL with an image `mediaType`); other files are refused."""
    out: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        kind = _kind(part, where)
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "file" and max_image_bytes is not None:
            media_type = part.get("mediaType")
            if not isinstance(media_type, str) or media_type.lower() not in images.IMAGE_TYPES:
                raise invalid(f"{where}.parts[{i}]: only PNG, JPEG, GIF or WebP image files are supported "
                              f"(got {str(media_type)[:40]!r})")
            image = images.url_part(part.get("url"), f"{where}.parts[{i}]", max_image_bytes)
            if image.get("media_type", media_type.lower()) != media_type.lower():
                raise invalid(f"{where}.parts[{i}]: the file is not the {media_type[:40]} it claims to be")
            out.append(image)
        elif kind not in IGNORED_PARTS and not kind.startswith("data-"):
            raise invalid(f"{where}: parts of type {kind[:40]!r} are not supported")
    return images.neutral_content(out)


def _kind(part: dict[str, Any], where: str) -> str:
    kind = part.get("type")
    if not isinstance(kind, str):
        raise invalid(f"{where}: every part needs a string 'type'")
    return kind


def assistant_turns(parts: list[Any], where: str) -> list[dict[str, Any]]:
    """An assistant UI message as neutral messages, in order: text and the tool calls made after
    it, their results, then any text that followed (a new assistant turn)."""
    out: list[dict[str, Any]] = []
    turn: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": []}
    results: list[dict[str, Any]] = []

    def flush() -> None:
        if turn["content"] or turn["tool_calls"]:
            out.append({k: v for k, v in turn.items() if k != "tool_calls" or v})
        out.extend(results)

    for part in parts:
        kind = _kind(part, where)
        if kind == "text" and isinstance(part.get("text"), str):
            if results:  # text after tool results starts the next assistant turn
                flush()
                turn, results = {"role": "assistant", "content": "", "tool_calls": []}, []
            turn["content"] += part["text"]
        elif kind.startswith("tool-") or kind == "dynamic-tool":
            if part.get("state") not in ("output-available", "output-error") or not isinstance(part.get("toolCallId"),
                                                                                                str):
                continue  # a call still streaming, or waiting for the client: nothing to replay yet
            name = str(part.get("toolName") if kind == "dynamic-tool" else kind.removeprefix("tool-"))
            turn["tool_calls"].append({"id": part["toolCallId"], "name": name,
                                       "arguments": json.dumps(part.get("input", {}))})
            failed = part["state"] == "output-error"
            output = part.get("errorText") if failed else part.get("output")
            results.append({"role": "tool", "tool_call_id": part["toolCallId"], "name": name, "is_error": failed,
                            "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind not in IGNORED_PARTS and not kind.startswith("data-"):
            raise invalid(f"{where}: parts of type {kind[:40]!r} are not supported")
    flush()
    return out


def neutral_messages(value: Any, settings: Settings) -> list[dict[str, Any]]:
    """UI messages (`{id, role, parts}`) as the relay's provider-neutral messages."""
    value = message_list(value, settings, "UI messages")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        parts = message.get("parts") if isinstance(message, dict) else None
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise invalid(f"{where} must be a UI message with 'parts'")
        role = message.get("role")
        if role in ("user", "system"):
            messages.append({"role": role, "content": _content(parts, where,
                                                               settings.MAX_IMAGE_BYTES if role == "user" else None)})
        elif role == "assistant":
            messages.extend(assistant_turns(parts, where))
        else:
            raise invalid(f"{where}.role must be user, assistant or system")
    if not messages or messages[-1]["role"] not in ("user", "tool") or not has_content(messages[-1]["content"]):
        raise invalid("the last message must be a non-empty user message")
    return messages


@bp.post("/api/chat/ui")
def chat_ui() -> Response:
    service = chat_service()
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    data = parse_json_object(request.get_data(cache=False))
    service.admit(g.caller)
    messages = neutral_messages(data.get("messages"), service.settings)
    options = {k: v for k, v in data.items() if k not in TRANSPORT_FIELDS}
    # useChat resends the whole chat each turn: no record unless asked, then of the new turn only.
    chat = parse_chat_request(options, service.settings, service.providers, service.tools, messages=messages,
                              records=new_turn(messages), keep_record=keep_record(data))
    reading = service.stream(g.caller, chat, wire=UiMessageStream(), transport="ai-sdk")
    return service.sse(reading, retry=False, headers=UiMessageStream.HEADERS)
