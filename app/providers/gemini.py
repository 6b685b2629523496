"""Gemini `streamGenerateContent?alt=sse`: `data:` chunks, no sentinel; the chunk with
`finishReason` is the end, and a connection that closes before it was cut."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

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

FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                  "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                  "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter"}


def gemini_parts(content: Any) -> list[dict[str, Any]]:
    """Neutral content as Gemini parts: text, and images inline (`inlineData`). Gemini takes
    no image by web URL (only files uploaded to it): such a request is refused before it is
    sent (`takes_image_urls`), and never fetched here."""
    if isinstance(content, str):
        return [{"text": content}]
    parts = []
    for part in content:
        if part["type"] == "text":
            parts.append({"text": part["text"]})
        elif part.get("data"):
            parts.append({"inlineData": {"mimeType": part["media_type"], "data": part["data"]}})
        else:
            raise ProviderError("invalid_request", "gemini takes images as data: URLs only, not by web URL",
                                status=400)
    return parts


def gemini_contents(task: Task, provider: str | None = None) -> list[dict[str, Any]]:
    """Chat messages as Gemini contents: calls as `functionCall` parts of a model turn,
    results as `functionResponse` parts of a user turn, consecutive turns of one role merged.

    `provider` names the provider this goes to: the thought signatures it produced go back on
    the part they came with, unchanged (Gemini 3 refuses a functionCall part of the current
    turn without its own); signatures another provider produced are dropped.
    """
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name (a result must name its function)
    for m in task.messages:
        role = m.get("role")
        parts: list[dict[str, Any]]
        if role == "system":
            continue
        if role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id", ""), "")
            role, parts = "user", [{"functionResponse": {"name": name, "response": {"result": m["content"]}}}]
        elif role == "assistant":
            role, parts = "model", ([{"text": m["content"]}] if m.get("content") else [])
            for call in m.get("tool_calls") or ():
                names[call["id"]] = call["name"]
                part: dict[str, Any] = {"functionCall": {"name": call["name"],
                                                         "args": parsed_arguments(call["arguments"])}}
                signature = call.get("signature") or {}
                if provider is not None and signature.get("provider") == provider:
                    part["thoughtSignature"] = signature.get("value")
                parts.append(part)
            for signed in m.get("signed") or ():
                if provider is None or signed.get("provider") != provider:
                    continue
                # A signature that came on a text part goes back on the turn's text, else on an
                # empty part of its own, as Gemini sends it at the end of an answer.
                if parts and "text" in parts[0] and "thoughtSignature" not in parts[0]:
                    parts[0]["thoughtSignature"] = signed["item"].get("thoughtSignature")
                else:
                    parts.append({"text": "", **signed["item"]})
        else:
            parts = gemini_parts(m["content"])
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"] += parts
        else:
            contents.append({"role": role, "parts": parts})
    return contents


# Gemini 3 takes a thinking level (Pro: low or high; Flash: minimal to high); 2.5 a token
# budget (at most 24576 on Flash). Sending both is a 400.
THINKING_LEVELS = {"low": "low", "medium": "medium", "high": "high"}
THINKING_BUDGETS = {"low": 1024, "medium": 8192, "high": 24576}
GEMINI_VERSION = re.compile(r"gemini-(\d+)")


def thinking_config(model: str, level: str) -> dict[str, Any]:
    """`generationConfig.thinkingConfig` for a reasoning level, by model generation."""
    version = GEMINI_VERSION.search(model)
    if version and int(version.group(1)) >= 3:
        chosen = THINKING_LEVELS[level]
        if chosen == "medium" and "flash" not in model:  # Pro models know only low and high
            chosen = "high"
        return {"includeThoughts": True, "thinkingLevel": chosen}
    return {"includeThoughts": True, "thinkingBudget": THINKING_BUDGETS[level]}


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
                text = part.get("text")
                signature = part.get("thoughtSignature")
                call = part.get("functionCall")
                if part.get("thought"):
                    if text:
                        out.append(Reasoning(text))
                elif text:
                    out.append(Text(text))
                if call:
                    self.calls += 1
                    out.append(ToolCall(call.get("id") or f"call_{self.calls}", call.get("name", ""),
                                        json.dumps(call.get("args") or {}),
                                        {"provider": self.provider, "value": signature} if signature else None))
                elif signature:  # on a text, thought or empty part: kept with the turn
                    out.append(Signed(self.provider, {"thoughtSignature": signature}))
            reason = candidate.get("finishReason")
            if reason:
                self.done = True
                finish = "tool_calls" if self.calls else FINISH_REASONS.get(reason, reason.lower())
                out.append(Finish(finish))
        meta = chunk.get("usageMetadata")
        if isinstance(meta, dict):  # cumulative on every chunk: the last one wins
            # Thoughts are counted apart from the candidates; the output is both (as OpenAI counts).
            thoughts = meta.get("thoughtsTokenCount")
            output = meta.get("candidatesTokenCount")
            if thoughts is not None:
                output = (output or 0) + thoughts
            out.append(Usage(meta.get("promptTokenCount"), output, meta.get("totalTokenCount"), thoughts))
        return out

    def finish(self) -> list[Delta]:
        if not self.done:
            raise cut_stream(self.provider, "a finishReason")
        return []


class GeminiProvider(HttpProvider):
    takes_image_urls = False  # only files uploaded to Gemini's own Files API

    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {"contents": gemini_contents(task, self.name)}
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
        if task.reasoning in THINKING_BUDGETS:
            config["thinkingConfig"] = thinking_config(task.model, task.reasoning or "")
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
