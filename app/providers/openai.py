"""The OpenAI chat-completions wire format, and the providers that speak it.

Groq, Mistral and OpenAI-compatible local servers (Ollama `/v1`, vLLM, llama.cpp) are
this adapter with other defaults, not copies of it: the differences are which token
limit field to send, whether `stream_options` is understood, and where usage hides.
"""

from __future__ import annotations

import json
from typing import Any

from app.decoders import SseEvent
from app.images import images_in
from app.providers.domain import Delta, Finish, ProviderError, Reasoning, Task, Text, ToolCall, Usage
from app.providers.transport import HttpProvider, cut_stream, stream_error

FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                  "function_call": "tool_calls", "content_filter": "content_filter"}


def openai_messages(task: Task) -> list[dict[str, Any]]:
    """The system prompt goes first as a `system` message; tool exchanges in OpenAI's shape."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": task.system}] if task.system else []
    for m in task.messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in m["tool_calls"]]
            messages.append({"role": "assistant", "content": m.get("content") or None, "tool_calls": calls})
        elif m.get("role") == "tool":
            messages.append({"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]})
        else:
            messages.append({"role": m["role"], "content": openai_content(m["content"])})
    return messages


def openai_content(content: Any) -> Any:
    """Neutral content in chat completions' shape: a string as is; images as `image_url` parts,
    with their bytes as a data: URL (what OpenAI, Groq, Mistral and compatible servers take)."""
    if isinstance(content, str):
        return content
    return [{"type": "image_url", "image_url": {"url": image_url(p)}} if p["type"] == "image"
            else {"type": "text", "text": p["text"]} for p in content]


def image_url(part: dict[str, Any]) -> str:
    """A neutral image part as a URL: its https URL, or its bytes as a data: URL."""
    return part.get("url") or f"data:{part['media_type']};base64,{part['data']}"


def openai_tool_choice(choice: str) -> Any:
    return choice if choice in ("auto", "none", "required") else {"type": "function", "function": {"name": choice}}


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    details = data.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(data.get("prompt_tokens"), data.get("completion_tokens"), data.get("total_tokens"), reasoning)


def _content_text(content: Any, kind: str = "text") -> str:
    """Mistral may send content as a list of parts: `text` parts are answer text, `thinking`
    parts (`{"type": "thinking", "thinking": [text parts]}`) its reasoning."""
    if isinstance(content, str):
        return content if kind == "text" else ""
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type", "text") != kind:
            continue
        if kind == "text":
            texts.append(part.get("text") or "")
        else:
            texts.append(_content_text(part.get("thinking")) if isinstance(part.get("thinking"), list)
                         else str(part.get("thinking") or ""))
    return "".join(texts)


def _reasoning_text(delta: dict[str, Any]) -> str:
    """Visible reasoning in a delta: `reasoning_content` (DeepSeek, vLLM, llama.cpp), `reasoning`
    (Groq, OpenRouter, Ollama, newer vLLM) or Mistral's `thinking` content parts."""
    text = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(text, str) and text:
        return text
    content = delta.get("content")
    return _content_text(content, "thinking") if isinstance(content, list) else ""


class OpenAIStreamParser:
    """`data:` chunks -> deltas; tool-call fragments are joined per index."""

    __slots__ = ("provider", "done", "finish_reason", "tool_parts")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.finish_reason: str | None = None
        self.tool_parts: dict[int, dict[str, Any]] = {}

    def feed(self, event: SseEvent) -> list[Delta]:
        data = event.data
        if data == "[DONE]":
            self.done = True
            return self._flush_tools()
        try:
            chunk = json.loads(data)
        except ValueError:
            return []  # not JSON and not [DONE]: nothing a client could use
        if not isinstance(chunk, dict):
            return []
        if event.event == "error" or (chunk.get("error") and not chunk.get("choices")):
            raise stream_error(chunk, self.provider)
        out: list[Delta] = []
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or {}
            reasoning = _reasoning_text(delta)
            if reasoning:
                out.append(Reasoning(reasoning))
            content = delta.get("content")
            if content:
                text = content if content.__class__ is str else _content_text(content)
                if text:
                    out.append(Text(text))
            if delta.get("tool_calls"):
                self._collect_tools(delta["tool_calls"])
            reason = choice.get("finish_reason")
            if reason:
                if reason == "error":  # Mistral ends a failed generation this way
                    raise stream_error({"error": {"type": "error", "message": "generation failed"}}, self.provider)
                self.finish_reason = FINISH_REASONS.get(reason, reason)
                out.extend(self._flush_tools())
                out.append(Finish(self.finish_reason))
        usage = _usage(chunk.get("usage")) or _usage((chunk.get("x_groq") or {}).get("usage"))
        if usage is not None:
            out.append(usage)
        return out

    def _collect_tools(self, calls: list[dict[str, Any]]) -> None:
        for position, call in enumerate(calls):
            index = call.get("index", position)  # Mistral may omit index
            part = self.tool_parts.setdefault(index, {"id": "", "name": "", "arguments": ""})
            function = call.get("function") or {}
            if call.get("id"):
                part["id"] = call["id"]
            if function.get("name"):
                part["name"] = function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # some compatible servers send an object
                arguments = json.dumps(arguments)
            if arguments:
                part["arguments"] += arguments

    def _flush_tools(self) -> list[Delta]:
        calls: list[Delta] = [ToolCall(p["id"] or f"call_{i}", p["name"], p["arguments"] or "{}")
                              for i, p in sorted(self.tool_parts.items())]
        self.tool_parts = {}
        return calls

    def finish(self) -> list[Delta]:
        if not self.done:
            raise cut_stream(self.provider, "data: [DONE]")
        return []


class OpenAIProvider(HttpProvider):
    """OpenAI chat completions (`POST {base}/chat/completions`)."""

    # OpenAI documents stream_options.include_usage; Groq and Mistral do not.
    send_stream_options = True
    # OpenAI deprecated max_tokens (reasoning models reject it).
    max_tokens_field = "max_completion_tokens"
    # `reasoning_effort` as each API documents it: OpenAI, Groq (gpt-oss) and vLLM take low,
    # medium and high; Mistral only "high" (or "none").
    reasoning_efforts = {"low": "low", "medium": "medium", "high": "high"}

    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {"model": task.model, "messages": openai_messages(task), "stream": True}
        if self.send_stream_options:
            body["stream_options"] = {"include_usage": True}
        if task.temperature is not None:
            body["temperature"] = task.temperature
        if task.max_tokens is not None:
            body[self.max_tokens_field] = task.max_tokens
        if task.tools:
            body["tools"] = [{"type": "function", "function": tool} for tool in task.tools]
            if task.tool_choice:
                body["tool_choice"] = openai_tool_choice(task.tool_choice)
        if task.stop:
            body["stop"] = task.stop
        effort = self.reasoning_efforts.get(task.reasoning or "")
        if effort:
            body["reasoning_effort"] = effort
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return f"{self.base_url}/chat/completions", headers, body

    def stream_parser(self, task: Task) -> OpenAIStreamParser:
        return OpenAIStreamParser(self.name)



class GroqProvider(OpenAIProvider):
    send_stream_options = False
    max_tokens_field = "max_tokens"


class MistralProvider(OpenAIProvider):
    send_stream_options = False
    max_tokens_field = "max_tokens"
    reasoning_efforts = {"low": "high", "medium": "high", "high": "high"}


class CompatibleProvider(OpenAIProvider):
    """Ollama `/v1`, vLLM, llama.cpp: the key is optional and often ignored."""

    key_required = False
    max_tokens_field = "max_tokens"  # what the local servers understand
    # A server the operator runs, often inside its network, that fetches an image URL itself
    # (vLLM, llama.cpp): a client's URL would be a request from there. Bytes only.
    takes_image_urls = False

    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        # Routes refuse a URL for this provider; a fallback (LLM_FALLBACKS) must refuse it too.
        if any(part.get("url") for part in images_in(task.messages)):
            raise ProviderError("invalid_request", f"{self.name} takes images as data: URLs only, not by web URL",
                                status=400)
        return super().build_request(task)
