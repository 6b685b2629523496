"""Anthropic Messages API (`POST {base}/v1/messages`): named SSE events, no [DONE]."""

from __future__ import annotations

import json
from typing import Any

from app.decoders import SseEvent
from app.providers.domain import (
    Delta,
    Finish,
    ProviderError,
    Reasoning,
    Signed,
    Task,
    Text,
    ToolCall,
    Usage,
    parsed_arguments,
    system_text,
)
from app.providers.transport import HttpProvider, cut_stream, stream_error

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                "tool_use": "tool_calls", "refusal": "content_filter", "pause_turn": "pause"}
# max_tokens is required by the API; used when the request does not set one.
DEFAULT_MAX_TOKENS = 4096
# Extended thinking's budget per requested level: the API's floor is 1024 tokens, and the
# budget counts against max_tokens (it must stay below it), so max_tokens grows by it.
THINKING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}


def anthropic_messages(task: Task, provider: str | None = None) -> list[dict[str, Any]]:
    """Messages in Anthropic's shape: no system role (those join `system`), tool calls as
    `tool_use` blocks, results as `tool_result` blocks of a user turn, and consecutive turns
    of one role merged (the API wants user and assistant to alternate).

    `provider` names the provider this goes to: an assistant turn's thinking blocks that it
    produced go back first in that turn, unchanged (with thinking on, the API refuses a tool
    round whose assistant turn does not start with them); anything signed elsewhere is dropped.
    """
    turns: list[dict[str, Any]] = []
    for m in task.messages:
        role = m.get("role")
        if role == "system":
            continue
        if role == "tool":
            role, blocks = "user", [{"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"],
                                     "is_error": bool(m.get("is_error"))}]
        elif role == "assistant":
            blocks = [s["item"] for s in m.get("signed") or () if s.get("provider") == provider]
            if m.get("content") or not (blocks or m.get("tool_calls")):
                blocks.append({"type": "text", "text": m.get("content") or ""})
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": parsed_arguments(c["arguments"])}
                       for c in m.get("tool_calls") or ()]
        else:
            blocks = anthropic_blocks(m["content"])
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    # Plain text turns stay plain strings, as most clients send them.
    for turn in turns:
        if len(turn["content"]) == 1 and turn["content"][0]["type"] == "text":
            turn["content"] = turn["content"][0]["text"]
    return turns


def anthropic_blocks(content: Any) -> list[dict[str, Any]]:
    """Neutral content as Anthropic content blocks: text, and `image` blocks with a base64 or
    url source (the API fetches a URL itself; the relay never does)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content:
        if part["type"] == "text":
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("url"):
            blocks.append({"type": "image", "source": {"type": "url", "url": part["url"]}})
        else:
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": part["media_type"],
                                                       "data": part["data"]}})
    return blocks


def anthropic_tool_choice(choice: str) -> dict[str, Any] | None:
    return {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(
        choice, {"type": "tool", "name": choice})


def whole_input(usage: dict[str, Any]) -> int | None:
    """The request's input tokens. With prompt caching Anthropic splits them: `input_tokens` are
    those after the last cache breakpoint, and the cached part is counted apart, read
    (`cache_read_input_tokens`) or written (`cache_creation_input_tokens`)."""
    tokens = usage.get("input_tokens")
    if not isinstance(tokens, int):
        return None
    cached = (usage.get("cache_read_input_tokens"), usage.get("cache_creation_input_tokens"))
    return tokens + sum(n for n in cached if isinstance(n, int))


class AnthropicStreamParser:
    """Events named as their `type`; text is `content_block_delta` / `text_delta`."""

    __slots__ = ("provider", "done", "input_tokens", "blocks", "thinking", "stop_reason")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.input_tokens: int | None = None
        self.blocks: dict[int, dict[str, Any]] = {}
        self.thinking: dict[int, dict[str, Any]] = {}  # thinking blocks being streamed, by index
        self.stop_reason: str | None = None

    def feed(self, event: SseEvent) -> list[Delta]:
        try:
            data = json.loads(event.data)
        except ValueError:
            return []
        if not isinstance(data, dict):
            return []
        kind = data.get("type") or event.event
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                return [Text(text)] if text else []
            if dtype == "input_json_delta":
                block = self.blocks.get(data.get("index", 0))
                if block is not None:
                    block["json"] += delta.get("partial_json") or ""
            elif dtype == "thinking_delta":
                thinking = delta.get("thinking") or ""
                block = self.thinking.get(data.get("index", 0))
                if block is not None:
                    block["thinking"] = (block.get("thinking") or "") + thinking
                return [Reasoning(thinking)] if thinking else []
            elif dtype == "signature_delta":
                block = self.thinking.get(data.get("index", 0))
                if block is not None:
                    block["signature"] = (block.get("signature") or "") + (delta.get("signature") or "")
            return []  # citations and delta types added later: not answer text
        if kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self.input_tokens = whole_input(usage)
            return [Usage(self.input_tokens, usage.get("output_tokens"))]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                self.blocks[data.get("index", 0)] = {"id": block.get("id", ""), "name": block.get("name", ""),
                                                     "json": ""}
            elif block.get("type") in ("thinking", "redacted_thinking"):
                # Kept as the API sent it (a redacted block is whole at its start): it goes back unchanged.
                self.thinking[data.get("index", 0)] = dict(block)
            return []
        if kind == "content_block_stop":
            index = data.get("index", 0)
            if index in self.thinking:
                return [Signed(self.provider, self.thinking.pop(index))]
            block = self.blocks.pop(index, None)
            if block is None:
                return []
            # An empty input means a tool that takes no arguments.
            return [ToolCall(block["id"], block["name"], block["json"] or "{}")]
        if kind == "message_delta":
            out: list[Delta] = []
            usage = data.get("usage")
            if isinstance(usage, dict):  # cumulative output count
                input_tokens = whole_input(usage) if "input_tokens" in usage else self.input_tokens
                out.append(Usage(input_tokens, usage.get("output_tokens")))
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                self.stop_reason = STOP_REASONS.get(reason, reason)
                out.append(Finish(self.stop_reason))
            return out
        if kind == "message_stop":
            self.done = True
            return []
        if kind == "error":
            raise stream_error(data, self.provider)
        return []  # ping and event types added later

    def finish(self) -> list[Delta]:
        if not self.done:
            raise cut_stream(self.provider, "message_stop")
        return []


class AnthropicProvider(HttpProvider):
    version = "2023-06-01"
    # A final assistant message is continued, not answered (used by failover).
    supports_prefill = True

    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        thinking = task.reasoning in THINKING_BUDGETS
        body: dict[str, Any] = {
            "model": task.model,
            # Thinking blocks go back only while thinking is on: the API ignores those of earlier
            # turns, and a request without thinking has no use for them.
            "messages": anthropic_messages(task, self.name if thinking else None),
            "max_tokens": task.max_tokens or DEFAULT_MAX_TOKENS,
            "stream": True,
        }
        if thinking:
            budget = THINKING_BUDGETS[task.reasoning or ""]
            # The budget must stay below max_tokens: the answer keeps what was asked for, on top.
            body["max_tokens"] += budget
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        system = system_text(task)
        if system:
            body["system"] = system
        # With thinking on, the API refuses any temperature but 1: the request's is left out.
        if task.temperature is not None and (not thinking or task.temperature == 1):
            body["temperature"] = task.temperature
        if task.tools:
            body["tools"] = [{"name": t["name"], "description": t.get("description", ""),
                              "input_schema": t.get("parameters", {"type": "object"})} for t in task.tools]
            if task.tool_choice:
                choice = anthropic_tool_choice(task.tool_choice)
                # Thinking allows only auto and none: a forced tool becomes a tool the model may choose.
                if thinking and choice is not None and choice["type"] in ("any", "tool"):
                    choice = {"type": "auto"}
                body["tool_choice"] = choice
        if task.stop:
            body["stop_sequences"] = task.stop
        headers = {"x-api-key": self.api_key or "", "anthropic-version": self.version}
        return f"{self.base_url}/v1/messages", headers, body

    def stream_parser(self, task: Task) -> AnthropicStreamParser:
        return AnthropicStreamParser(self.name)

    def error_message(self, body: Any) -> tuple[str | None, float | None]:
        message, delay = super().error_message(body)
        if message and isinstance(body, dict) and isinstance(body.get("error"), dict):
            kind = body["error"].get("type")
            if kind:
                message = f"{kind}: {message}"
        return message, delay


__all__ = ["AnthropicProvider", "AnthropicStreamParser", "ProviderError"]
