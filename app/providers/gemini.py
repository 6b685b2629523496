"""Gemini `streamGenerateContent?alt=sse`: `data:` chunks, no sentinel; the chunk with
`finishReason` is the end, and a connection that closes before it was cut."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from app.decoders import SseEvent
from app.providers.base import (
    Delta,
    Finish,
    HttpProvider,
    ProviderError,
    Task,
    Text,
    ToolCall,
    Usage,
    cut_stream,
    parsed_arguments,
    stream_error,
    system_text,
)

FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                  "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                  "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter"}


def gemini_contents(task: Task) -> list[dict[str, Any]]:
    """Chat messages as Gemini contents: calls as `functionCall` parts of a model turn,
    results as `functionResponse` parts of a user turn, consecutive turns of one role merged."""
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name (a result must name its function)
    for m in task.messages:
        role = m.get("role")
        if role == "system":
            continue
        if role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""), "")
            role, parts = "user", [{"functionResponse": {"name": name, "response": {"result": m["content"]}}}]
        elif role == "assistant":
            role, parts = "model", ([{"text": m["content"]}] if m.get("content") else [])
            for call in m.get("tool_calls") or ():
                names[call["id"]] = call["name"]
                parts.append({"functionCall": {"name": call["name"], "args": parsed_arguments(call["arguments"])}})
        else:
            parts = [{"text": m["content"]}]
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})
    return contents


GEMINI_MODES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}


class GeminiStreamParser:
    __slots__ = ("provider", "done", "usage", "calls")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.usage: Usage | None = None
        self.calls = 0

    def feed(self, event: SseEvent) -> list[Delta]:
        try:
            chunk = json.loads(event.data)
        except ValueError:
            return []
        if not isinstance(chunk, dict):
            return []
        if chunk.get("error"):
            raise stream_error(chunk, self.provider)
        out: list[Delta] = []
        candidates = chunk.get("candidates")
        if not candidates:
            block = (chunk.get("promptFeedback") or {}).get("blockReason")
            if block:
                raise ProviderError("upstream_blocked", f"{self.provider} blocked the prompt", detail=str(block))
        else:
            candidate = candidates[0]
            for part in (candidate.get("content") or {}).get("parts") or ():
                if part.get("thought"):
                    continue
                text = part.get("text")
                if text:
                    out.append(Text(text))
                call = part.get("functionCall")
                if call:
                    self.calls += 1
                    out.append(ToolCall(call.get("id") or f"call_{self.calls}", call.get("name", ""),
                                        json.dumps(call.get("args") or {})))
            reason = candidate.get("finishReason")
            if reason:
                self.done = True
                finish = "tool_calls" if self.calls else FINISH_REASONS.get(reason, reason.lower())
                out.append(Finish(finish))
        meta = chunk.get("usageMetadata")
        if isinstance(meta, dict):  # cumulative on every chunk: the last one wins
            out.append(Usage(meta.get("promptTokenCount"), meta.get("candidatesTokenCount"),
                             meta.get("totalTokenCount")))
        return out

    def finish(self) -> list[Delta]:
        if not self.done:
            raise cut_stream(self.provider, "a finishReason")
        return []


class GeminiProvider(HttpProvider):
    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {"contents": gemini_contents(task)}
        system = system_text(task)
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        config: dict[str, Any] = {}
        if task.temperature is not None:
            config["temperature"] = task.temperature
        if task.max_tokens is not None:
            config["maxOutputTokens"] = task.max_tokens
        if task.stop:
            config["stopSequences"] = task.stop
        if config:
            body["generationConfig"] = config
        if task.tools:
            body["tools"] = [{"functionDeclarations": task.tools}]
            if task.tool_choice:
                calling: dict[str, Any] = {"mode": GEMINI_MODES.get(task.tool_choice, "ANY")}
                if task.tool_choice not in GEMINI_MODES:  # one named function
                    calling["allowedFunctionNames"] = [task.tool_choice]
                body["toolConfig"] = {"functionCallingConfig": calling}
        # alt=sse selects SSE framing; without it the endpoint streams one JSON array.
        url = f"{self.base_url}/models/{quote(task.model, safe='')}:streamGenerateContent?alt=sse"
        return url, {"x-goog-api-key": self.api_key or ""}, body

    def stream_parser(self, task: Task) -> GeminiStreamParser:
        return GeminiStreamParser(self.name)

    def error_message(self, body: Any) -> tuple[str | None, float | None]:
        message, _ = super().error_message(body)
        delay = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            for detail in err.get("details") or ():
                value = detail.get("retryDelay") if isinstance(detail, dict) else None
                if isinstance(value, str) and value.endswith("s"):
                    try:  # a 429's delay is in the body ("12.77s"), not a header
                        delay = float(value[:-1])
                    except ValueError:
                        pass
        return message, delay
