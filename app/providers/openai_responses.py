"""The OpenAI Responses API (`POST {base}/responses`), for `OPENAI_API=responses`.

Reasoning summaries, and the reasoning state a reasoning model needs across tool rounds,
are only on this API. It is called statelessly (`store: false`): every request carries the
whole exchange, and the encrypted reasoning items the model produced come back to it
unchanged (`include: ["reasoning.encrypted_content"]`), since OpenAI refuses a replayed
`function_call` item without the reasoning item that came before it.

Wire facts from the openai-python SDK's `types/responses` (request params, stream events,
`ResponseReasoningItem`, `ResponseUsage`) and OpenAI's function-calling guide; see
docs/configuration.md (`OPENAI_API`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

from app.decoders import SseEvent
from app.providers.domain import (
    Cancellation,
    Delta,
    Finish,
    ProviderError,
    Reasoning,
    Signed,
    Task,
    Text,
    ToolCall,
    Usage,
)
from app.providers.transport import HttpProvider, cut_stream, event_object

log = logging.getLogger("llm_sse_relay.upstream")

INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}
# Error codes worth a retry before the first token (ResponseError.code, error events).
RETRYABLE_CODES = frozenset({"server_error", "rate_limit_exceeded", "too_many_requests"})
# An error code is shown to the client only when it looks like one (an enum word, not prose).
ERROR_CODE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
# Between two reasoning summary parts: each part is a paragraph of its own.
PART_BREAK = "\n\n"


# ---------------------------------------------------------------- the request


def responses_content(content: Any) -> Any:
    """A user message's content: a string as is; neutral parts as input_text / input_image."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if part.get("type") == "image":
            url = part.get("url") or f"data:{part['media_type']};base64,{part['data']}"
            # `detail` is required by the API's input_image; "auto" lets the model choose.
            parts.append({"type": "input_image", "image_url": url, "detail": "auto"})
        else:
            parts.append({"type": "input_text", "text": part.get("text", "")})
    return parts


def responses_input(task: Task, provider: str) -> list[dict[str, Any]]:
    """The neutral messages as Responses input items.

    An assistant turn becomes what the model produced, in its order: this provider's
    signed reasoning items first (exactly as received), then its text, then one
    `function_call` item per call. Tool results are `function_call_output` items. A
    `function_call` item carries no item `id`: with `store: false` OpenAI cannot look ids
    up, and `call_id` is what pairs a call with its output.
    """
    items: list[dict[str, Any]] = []
    for m in task.messages:
        role = m.get("role")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
        elif role == "assistant":
            items += [s["item"] for s in m.get("signed") or () if s.get("provider") == provider]
            if m.get("content"):
                items.append({"role": "assistant", "content": m["content"]})
            items += [{"type": "function_call", "call_id": c["id"], "name": c["name"], "arguments": c["arguments"]}
                      for c in m.get("tool_calls") or ()]
        else:
            items.append({"role": role, "content": responses_content(m["content"])})
    return items


def responses_tool_choice(choice: str) -> Any:
    return choice if choice in ("auto", "none", "required") else {"type": "function", "name": choice}


# ---------------------------------------------------------------- the stream


def _usage(response: Any) -> Usage | None:
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("output_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(usage.get("input_tokens"), usage.get("output_tokens"), usage.get("total_tokens"),
                 reasoning_tokens=reasoning)


def _failure(provider: str, error: Any, what: str) -> ProviderError:
    """An error reported inside the stream. The client is told in our words, with the
    error's code when it is one; the provider's own text goes to the log."""
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or error.get("type")
    log.warning("%s: %s: code=%r message=%r", provider, what, code, error.get("message"))
    shown = f" ({code})" if isinstance(code, str) and ERROR_CODE.fullmatch(code) else ""
    return ProviderError("upstream_error", f"{provider} could not complete the answer{shown}",
                         retryable=code in RETRYABLE_CODES)


class ResponsesStreamParser:
    """Responses stream events -> deltas.

    Every event names itself in `type` (and in the SSE `event:` field). Function calls are
    collected per output item and emitted whole when the item is done; a reasoning item is
    emitted as `Signed` when done, since `output_item.added` may hold incomplete
    `encrypted_content`. The stream ends with `response.completed`, `.incomplete` or
    `.failed`; anything else ending it means it was cut.
    """

    __slots__ = ("provider", "done", "calls", "called", "reasoned")

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.calls: dict[Any, dict[str, str]] = {}  # by output_index: call_id, name, arguments so far
        self.called = False
        self.reasoned = False

    def feed(self, event: SseEvent) -> list[Delta]:
        data = event_object(event)
        if data is None:
            return []
        kind = data.get("type") or event.event
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            # A refusal is what the model answers instead: without it the reader gets nothing.
            text = data.get("delta")
            return [Text(text)] if text else []
        if kind == "response.reasoning_summary_text.delta" or kind == "response.reasoning_text.delta":
            # reasoning_text: raw reasoning, which servers running open-weight models send.
            text = data.get("delta")
            if not text:
                return []
            self.reasoned = True
            return [Reasoning(text)]
        if kind == "response.reasoning_summary_part.added":
            return [Reasoning(PART_BREAK)] if self.reasoned else []
        if kind == "response.output_item.added":
            item = data.get("item") or {}
            if item.get("type") == "function_call":
                self.calls[data.get("output_index")] = {"call_id": item.get("call_id") or "",
                                                        "name": item.get("name") or "", "arguments": ""}
            return []
        if kind == "response.function_call_arguments.delta":
            call = self.calls.get(data.get("output_index"))
            if call is not None:
                call["arguments"] += data.get("delta") or ""
            return []
        if kind == "response.function_call_arguments.done":
            call = self.calls.get(data.get("output_index"))
            if call is not None and isinstance(data.get("arguments"), str):
                call["arguments"] = data["arguments"]
            return []
        if kind == "response.output_item.done":
            return self._item_done(data.get("output_index"), data.get("item") or {})
        if kind == "response.completed":
            self.done = True
            response = data.get("response") or {}
            out = self._pending_calls()
            usage = _usage(response)
            if usage is not None:
                out.append(usage)
            out.append(Finish("tool_calls" if self.called else "stop"))
            return out
        if kind == "response.incomplete":
            self.done = True
            response = data.get("response") or {}
            reason = str((response.get("incomplete_details") or {}).get("reason") or "incomplete")
            out = self._pending_calls()
            usage = _usage(response)
            if usage is not None:
                out.append(usage)
            out.append(Finish(INCOMPLETE_REASONS.get(reason, reason)))
            return out
        if kind == "response.failed":
            raise _failure(self.provider, (data.get("response") or {}).get("error"), "response.failed")
        if kind == "error":
            # Documented with code and message at the top; seen nested under "error" too.
            raise _failure(self.provider, data.get("error") if isinstance(data.get("error"), dict) else data,
                           "error event")
        return []  # created, in_progress, content parts, *.done texts, and events added later

    def _item_done(self, index: Any, item: dict[str, Any]) -> list[Delta]:
        kind = item.get("type")
        if kind == "function_call":
            call = self.calls.pop(index, None) or {"call_id": "", "name": "", "arguments": ""}
            arguments = item.get("arguments") if isinstance(item.get("arguments"), str) else call["arguments"]
            self.called = True
            return [ToolCall(item.get("call_id") or call["call_id"] or f"call_{index}",
                             item.get("name") or call["name"], arguments or "{}")]
        if kind == "reasoning" and item.get("encrypted_content"):
            # Without encrypted_content the item is only an id OpenAI did not store: useless back.
            return [Signed(self.provider, item)]
        return []

    def _pending_calls(self) -> list[Delta]:
        """Calls whose `output_item.done` never came: what their arguments events said."""
        out: list[Delta] = []
        for index in sorted(self.calls, key=lambda i: i if isinstance(i, int) else -1):
            out += self._item_done(index, {"type": "function_call"})
        return out

    def finish(self) -> list[Delta]:
        if not self.done:
            raise cut_stream(self.provider, "response.completed")
        return []


# ---------------------------------------------------------------- stop strings


class StopScanner:
    """Ends the answer at the first stop string, as chat completions' `stop` does (the
    string itself is not part of the answer): the Responses API has no such parameter.
    Text that may be the start of a stop string is held back until the next piece tells."""

    __slots__ = ("stops", "held")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that can go out now, and whether a stop string was reached."""
        buffer = self.held + text
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buffer[:min(found)], True
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buffer) + 1))
                    if buffer.endswith(s[:k])), default=0)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def until_stop(deltas: Iterator[Delta], scanner: StopScanner) -> Iterator[Delta]:
    """`deltas` cut at the first stop string. Leaving closes `deltas`, which closes the
    upstream response: nothing more is generated (and the usage of the cut answer is not
    known)."""
    try:
        for delta in deltas:
            if delta.__class__ is Text:
                text, reached = scanner.feed(delta.text)
                if text:
                    yield Text(text)
                if reached:
                    yield Finish("stop")
                    return
                continue
            if delta.__class__ in (Finish, ToolCall):
                held = scanner.flush()
                if held:
                    yield Text(held)
            yield delta
        held = scanner.flush()
        if held:
            yield Text(held)
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------- the provider


class OpenAIResponsesProvider(HttpProvider):
    """OpenAI through `POST {base}/responses` (the `openai` provider with OPENAI_API=responses)."""

    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {
            "model": task.model,
            "input": responses_input(task, self.name),
            "stream": True,
            # Stateless: nothing is kept at OpenAI; the reasoning state travels in the requests.
            "store": False,
            "include": ["reasoning.encrypted_content"],
        }
        if task.system:
            body["instructions"] = task.system
        if task.temperature is not None:
            body["temperature"] = task.temperature
        if task.max_tokens is not None:
            body["max_output_tokens"] = task.max_tokens
        if task.reasoning:
            body["reasoning"] = {"effort": task.reasoning, "summary": "auto"}
        if task.tools:
            # strict: false, said explicitly: without it Responses makes every tool strict,
            # which turns optional parameters into required ones (chat's default is non-strict).
            body["tools"] = [{"type": "function", "name": t["name"], "description": t.get("description", ""),
                              "parameters": t.get("parameters", {"type": "object"}), "strict": False}
                             for t in task.tools]
            if task.tool_choice:
                body["tool_choice"] = responses_tool_choice(task.tool_choice)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return f"{self.base_url}/responses", headers, body

    def stream_parser(self, task: Task) -> ResponsesStreamParser:
        return ResponsesStreamParser(self.name)

    def stream(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        deltas = super().stream(task, cancel)
        return until_stop(deltas, StopScanner(task.stop)) if task.stop else deltas


__all__ = ["OpenAIResponsesProvider", "ResponsesStreamParser", "StopScanner", "responses_input"]
