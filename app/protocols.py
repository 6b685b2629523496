"""What a stream says to its client: the relay's event protocol, or OpenAI's chunk format.

A `Generation` produces normalized deltas; a protocol object turns them into encoded SSE
frames for its log, once per stream (every reader of the log copies bytes). Each
protocol is a `WireEncoder` (`opening`, `text`, `reasoning`, `signed`, `meta`, `tool_call`
and `closing`) and keeps what it needs between them (event ids, the tool call index). The
SSE framing itself lives in app/sse.py: every frame here is one of its `ServerSentEvent`s.

- `RelayEvents`: msgid, token, reasoning, meta, done, error (docs/http-api.md). Event ids count
  frames, so a reader resumes at log position = Last-Event-ID.
- `OpenAIChunks`: `chat.completion.chunk` objects and `data: [DONE]`, as the official
  OpenAI SDKs read them (docs/openai-api.md).
- `UiMessageStream`: the Vercel AI SDK's UI message stream (`x-vercel-ai-ui-message-stream:
  v1`), what `useChat` reads (docs/ai-sdk.md).
- `AnthropicEvents`: Anthropic's Messages stream, named events and `event: ping` heartbeats
  (docs/anthropic-api.md).
- `ResponseEvents`: OpenAI's Responses API stream, semantic events with a `sequence_number`
  (docs/openai-api.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import anthropic_error_type
from app.providers.domain import Signed, ToolCall
from app.sse import DONE, encode_data, encode_event, read_events


@dataclass
class Ending:
    """How an answer ended: `error` set when it failed, else its finish reason."""

    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    report_usage: bool = False  # usage or a finish reason came from the provider


class WireEncoder(Protocol):
    """What every wire format provides: encoded frames for one stream's log, from its opening
    to its closing, one call per delta. None: the format says nothing for that delta."""

    def opening(self, stream_id: str, conversation_id: str, provider: str, model: str,
                request_id: str = "-") -> list[bytes]: ...

    def text(self, text: str) -> bytes: ...

    def reasoning(self, text: str) -> bytes | None: ...

    def signed(self, item: Signed) -> bytes | None: ...

    def meta(self, data: dict[str, Any]) -> bytes | None: ...

    def tool_call(self, call: ToolCall) -> bytes | None: ...

    def closing(self, ending: Ending) -> list[bytes]: ...


class RelayEvents:
    """The relay's own event protocol. `next_id`: the id of the first event it writes (after
    the frames of a stored log it continues, their count + 1)."""

    def __init__(self, next_id: int = 1) -> None:
        self.next_id = next_id

    def _take_id(self) -> int:
        event_id = self.next_id
        self.next_id += 1
        return event_id

    def opening(self, stream_id: str, conversation_id: str, provider: str, model: str,
                request_id: str = "-") -> list[bytes]:
        return [encode_event(self._take_id(), "msgid", {"id": stream_id, "conversation_id": conversation_id,
                                                         "provider": provider, "model": model,
                                                         "request_id": request_id})]

    def text(self, text: str) -> bytes:
        return encode_event(self._take_id(), "token", {"text": text})

    def reasoning(self, text: str) -> bytes:
        return encode_event(self._take_id(), "reasoning", {"text": text})

    def meta(self, data: dict[str, Any]) -> bytes | None:
        return encode_event(self._take_id(), "meta", data)

    def tool_call(self, call: ToolCall) -> bytes | None:
        return None  # server-side tools report through `meta`; calls are kept in the record

    def signed(self, item: Signed) -> bytes | None:
        return None  # kept in the conversation record, which later turns replay

    @staticmethod
    def text_of(frames: list[bytes]) -> str:
        """The answer text that a stream's frames carry (for a producer that continues it)."""
        return "".join(json.loads(event.data)["text"] for event in read_events(frames) if event.event == "token")

    def closing(self, ending: Ending) -> list[bytes]:
        frames = []
        if ending.report_usage:
            frames.append(encode_event(self._take_id(), "meta",
                                       {"usage": ending.usage, "finish_reason": ending.finish_reason}))
        if ending.error is not None:
            frames.append(encode_event(self._take_id(), "error", ending.error))
        else:
            frames.append(encode_event(self._take_id(), "done",
                                       {"finish_reason": ending.finish_reason, "usage": ending.usage}))
        return frames


def openai_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    out: dict[str, Any] = {"prompt_tokens": usage.get("input_tokens") or 0,
                           "completion_tokens": usage.get("output_tokens") or 0,
                           "total_tokens": usage.get("total_tokens") or 0}
    if usage.get("reasoning_tokens") is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": usage["reasoning_tokens"]}
    return out


THINKING_BLOCKS = ("thinking", "redacted_thinking")


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A tool call in OpenAI's shape; a Gemini thought signature rides along where Gemini's own
    OpenAI-compatible API puts it (`extra_content.google.thought_signature`), so a client that
    sends the call back sends the signature back too."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
    if call.signature:
        out["extra_content"] = {"google": {"thought_signature": call.signature["value"]}}
    return out


def thinking_blocks(signed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic thinking blocks among an answer's signed items, for OpenAI clients: the
    `thinking_blocks` field LiteLLM gives an assistant message (and reads back from it)."""
    return [s["item"] for s in signed if s["item"].get("type") in THINKING_BLOCKS]


def openai_finish(reason: str | None) -> str:
    """OpenAI's finish reasons; a stream stopped on request ends as "stop"."""
    return reason if reason in ("stop", "length", "tool_calls", "content_filter") else "stop"


class OpenAIChunks:
    """OpenAI's streaming chat completion: one `chat.completion.chunk` per delta."""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self.completion_id = ""
        self.tool_index = 0

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices, **extra}
        return encode_data(data)

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def opening(self, stream_id: str, conversation_id: str, provider: str, model: str,
                request_id: str = "-") -> list[bytes]:
        self.completion_id = f"chatcmpl-{stream_id}"
        return [self._delta({"role": "assistant", "content": ""})]

    def text(self, text: str) -> bytes:
        return self._delta({"content": text})

    def reasoning(self, text: str) -> bytes:
        # Not in OpenAI's own chunks: the field DeepSeek and LiteLLM stream reasoning in.
        return self._delta({"reasoning_content": text})

    def meta(self, data: dict[str, Any]) -> bytes | None:
        return None  # retries, rate limits: nothing an OpenAI client expects

    def tool_call(self, call: ToolCall) -> bytes | None:
        # Calls reach the relay whole; one fragment with all its arguments is what OpenAI sends
        # for short calls too, and clients concatenate fragments per index either way.
        index, self.tool_index = self.tool_index, self.tool_index + 1
        return self._delta({"tool_calls": [openai_tool_call(call, index)]})

    def signed(self, item: Signed) -> bytes | None:
        if item.item.get("type") not in THINKING_BLOCKS:
            return None
        return self._delta({"thinking_blocks": [item.item]})

    def closing(self, ending: Ending) -> list[bytes]:
        if ending.error is not None:
            # What OpenAI sends when a stream fails: the SDKs raise an APIError for it.
            error = {"message": ending.error.get("message"), "type": ending.error.get("type"),
                     "param": None, "code": ending.error.get("type")}
            return [encode_data({"error": error})]
        frames = [self._delta({}, openai_finish(ending.finish_reason))]
        if self.include_usage:
            frames.append(self._chunk([], usage=openai_usage(ending.usage)))
        return frames + [DONE]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return text


UI_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool-calls", "content_filter": "content-filter"}


class UiMessageStream:
    """The AI SDK's UI message stream: start, reasoning-start/delta/end, text-start/delta/end,
    tool parts, finish, [DONE]. One block (reasoning or text) is open at a time."""

    HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}

    def __init__(self) -> None:
        self.text_id: str | None = None  # the open text block, if any
        self.reasoning_id: str | None = None  # the open reasoning block, if any
        self.blocks = 0
        self.message_id = ""

    @staticmethod
    def _part(data: dict[str, Any]) -> bytes:
        return encode_data(data)

    def _close_text(self) -> bytes:
        frame = self._part({"type": "text-end", "id": self.text_id}) if self.text_id else b""
        self.text_id = None
        return frame + self._close_reasoning()

    def _close_reasoning(self) -> bytes:
        frame = self._part({"type": "reasoning-end", "id": self.reasoning_id}) if self.reasoning_id else b""
        self.reasoning_id = None
        return frame

    def opening(self, stream_id: str, conversation_id: str, provider: str, model: str,
                request_id: str = "-") -> list[bytes]:
        self.message_id = f"msg-{stream_id}"
        return [self._part({"type": "start", "messageId": self.message_id}), self._part({"type": "start-step"})]

    def text(self, text: str) -> bytes:
        if self.text_id is not None:
            return self._part({"type": "text-delta", "id": self.text_id, "delta": text})
        self.blocks += 1
        self.text_id = f"text-{self.blocks}"
        return (self._close_reasoning() + self._part({"type": "text-start", "id": self.text_id})
                + self._part({"type": "text-delta", "id": self.text_id, "delta": text}))

    def reasoning(self, text: str) -> bytes:
        if self.reasoning_id is not None:
            return self._part({"type": "reasoning-delta", "id": self.reasoning_id, "delta": text})
        opened = self._close_text()
        self.blocks += 1
        self.reasoning_id = f"reasoning-{self.blocks}"
        return (opened + self._part({"type": "reasoning-start", "id": self.reasoning_id})
                + self._part({"type": "reasoning-delta", "id": self.reasoning_id, "delta": text}))

    def meta(self, data: dict[str, Any]) -> bytes | None:
        tool = data.get("tool")
        if not isinstance(tool, dict) or "id" not in tool:
            return None  # retries, rate limits, the round limit: nothing useChat shows
        # A server-side tool (app.tools): its input, then its output, as the SDK's tool parts.
        if tool["status"] == "running":
            return self._close_text() + self._part({"type": "tool-input-available", "toolCallId": tool["id"],
                                                    "toolName": tool["name"],
                                                    "input": _json_or_text(tool["arguments"])})
        if tool["status"] == "done":
            return self._part({"type": "tool-output-available", "toolCallId": tool["id"],
                               "output": _json_or_text(tool.get("result", ""))})
        return self._part({"type": "tool-output-error", "toolCallId": tool["id"],
                           "errorText": tool.get("result", "the tool failed")})

    def tool_call(self, call: ToolCall) -> bytes | None:
        return None  # server-side tools announce themselves through meta

    def signed(self, item: Signed) -> bytes | None:
        return None  # the tool rounds that need it run here, within the request

    def closing(self, ending: Ending) -> list[bytes]:
        frames = [self._close_text()] if self.text_id or self.reasoning_id else []
        if ending.error is not None:
            return frames + [self._part({"type": "error", "errorText": ending.error.get("message") or "error"}),
                             DONE]
        finish = UI_FINISH.get(ending.finish_reason, "other" if ending.finish_reason != "stopped" else "stop")
        return frames + [self._part({"type": "finish-step"}), self._part({"type": "finish", "finishReason": finish}),
                         DONE]


# ------------------------------------------------------------------ Anthropic's Messages stream

ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "stop_sequence": "stop_sequence", "content_filter": "refusal", "pause": "pause_turn"}
# What a client of the Messages route is told when the provider failed: a status and our own
# words (a provider's text can name its account, organisation or internals). Anthropic's SDKs
# pick the exception class by status, so the statuses are Anthropic's.
ANTHROPIC_UPSTREAM_STATUS = {
    429: (429, "the model provider is rate limiting this server; try again shortly"),
    503: (529, "the model provider is overloaded; try again shortly"),
    529: (529, "the model provider is overloaded; try again shortly"),
    400: (400, "the model provider refused this request"),
    422: (400, "the model provider refused this request"),
    404: (404, "the model provider does not offer this model"),
    413: (413, "the request is too large for the model provider"),
}
ANTHROPIC_UPSTREAM_KIND = {
    "upstream_timeout": (500, "the model provider did not answer in time"),
    "upstream_unreachable": (500, "the model provider could not be reached"),
    "upstream_disconnected": (500, "the model provider stopped before the end of its answer"),
    "upstream_protocol_error": (500, "the model provider sent a malformed answer"),
    "upstream_blocked": (400, "the model provider refused this prompt"),
    "upstream_auth": (500, "the model provider refused this server's credentials"),
}


def anthropic_stop_reason(finish: str | None) -> str:
    """Anthropic's stop reason for a normalized finish reason; an answer stopped early ends its turn."""
    return ANTHROPIC_STOP.get(finish or "stop", "end_turn")


def anthropic_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {"input_tokens": usage.get("input_tokens") or 0, "output_tokens": usage.get("output_tokens") or 0}


def anthropic_failure(error: dict[str, Any]) -> tuple[int, str]:
    """(status, message) for a failed answer (a `ProviderError.as_event()` or the relay's own error)."""
    kind = str(error.get("type") or "")
    if error.get("status") in ANTHROPIC_UPSTREAM_STATUS:
        return ANTHROPIC_UPSTREAM_STATUS[error["status"]]
    if kind in ANTHROPIC_UPSTREAM_KIND:
        return ANTHROPIC_UPSTREAM_KIND[kind]
    if kind.startswith("upstream_"):
        return 500, "the model provider failed to answer"
    return 500, str(error.get("message") or "the server failed while answering")  # the relay's own words


class AnthropicEvents:
    """Anthropic's Messages stream, as its SDKs read it: `message_start`, then content blocks
    (`content_block_start`, `content_block_delta`, `content_block_stop`) numbered from 0 in
    order, `message_delta` with the stop reason and usage, `message_stop`. Every event is named
    as its `type` (the SDKs skip unnamed events); a failure is `event: error`. Heartbeats are
    `KEEPALIVE` events, since these clients take no comment as a sign of life."""

    KEEPALIVE = encode_event(None, "ping", {"type": "ping"})

    def __init__(self, model: str) -> None:
        self.model = model  # as the client named it
        self.provider = ""
        self.index = -1  # of the last block started
        self.open: str | None = None  # the type of the block still open
        # (status, message) of an answer that failed before any content: what the route
        # answers as an HTTP error when the response has not started yet.
        self.failed_early: tuple[int, str] | None = None

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return encode_event(None, data["type"], data)

    def _stop(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return self._event({"type": "content_block_stop", "index": self.index})

    def _start(self, block: dict[str, Any]) -> bytes:
        frames = self._stop()
        self.index += 1
        self.open = block["type"]
        return frames + self._event({"type": "content_block_start", "index": self.index, "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return self._event({"type": "content_block_delta", "index": self.index, "delta": delta})

    def opening(self, stream_id: str, conversation_id: str, provider: str, model: str,
                request_id: str = "-") -> list[bytes]:
        self.provider = provider
        # Sent before the provider answers, so the token counts come with message_delta (the
        # SDKs take input_tokens from there too).
        message: dict[str, Any] = {"id": f"msg_{stream_id}", "type": "message", "role": "assistant", "content": [],
                   "model": self.model, "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [self._event({"type": "message_start", "message": message})]

    def text(self, text: str) -> bytes:
        frames = b"" if self.open == "text" else self._start({"type": "text", "text": ""})
        return frames + self._delta({"type": "text_delta", "text": text})

    def reasoning(self, text: str) -> bytes:
        """Visible thinking (a `Reasoning` delta) as a thinking block."""
        frames = b"" if self.open == "thinking" else self._start({"type": "thinking", "thinking": ""})
        return frames + self._delta({"type": "thinking_delta", "thinking": text})

    def signed(self, delta: Signed) -> bytes | None:
        """A provider's signed reasoning: an Anthropic thinking block's signature ends the block its
        text streamed into (`signature_delta`); a redacted block goes out whole. Only what the
        provider of this stream produced: a signature is worth nothing to any other."""
        item = delta.item
        if delta.provider != self.provider or not isinstance(item, dict):
            return None
        if item.get("type") == "redacted_thinking" and isinstance(item.get("data"), str):
            return self._start({"type": "redacted_thinking", "data": item["data"]}) + self._stop()
        if item.get("type") != "thinking" or not isinstance(item.get("signature"), str):
            return None
        frames = b""
        if self.open != "thinking":  # its text did not stream as reasoning: send it now
            frames = self._start({"type": "thinking", "thinking": ""})
            frames += self._delta({"type": "thinking_delta", "thinking": str(item.get("thinking") or "")})
        return frames + self._delta({"type": "signature_delta", "signature": item["signature"]}) + self._stop()

    def meta(self, data: dict[str, Any]) -> bytes | None:
        return None  # retries, rate limits: nothing an Anthropic client expects

    def tool_call(self, call: ToolCall) -> bytes | None:
        # Calls reach the relay whole: one input_json_delta with all of the input.
        return (self._start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                + self._delta({"type": "input_json_delta", "partial_json": call.arguments}) + self._stop())

    def closing(self, ending: Ending) -> list[bytes]:
        if ending.error is not None:
            status, message = anthropic_failure(ending.error)
            if self.index < 0:
                self.failed_early = (status, message)
            return [self._event({"type": "error", "error": {"type": anthropic_error_type(status),
                                                             "message": message}})]
        frames = [self._stop()] if self.open else []
        return frames + [
            self._event({"type": "message_delta",
                         "delta": {"stop_reason": anthropic_stop_reason(ending.finish_reason), "stop_sequence": None},
                         "usage": anthropic_usage(ending.usage)}),
            self._event({"type": "message_stop"}),
        ]


# ------------------------------------------------------------------ OpenAI's Responses API
# Shapes from openai-python's `types/responses` (Response, ResponseStreamEvent, the output
# items, ResponseUsage); docs/openai-api.md.

# Why a response stopped short, as `incomplete_details.reason`.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_item_id(kind: str, response_id: str, output_index: int) -> str:
    """An output item's id, derived from its response's: the streamed items and the stored
    object (GET /v1/responses/{id}) name the same item alike."""
    return f"{kind}_{response_id.removeprefix('resp_')}_{output_index}"


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    """A `ResponseUsage`; counts a provider did not report are 0."""
    usage = usage or {}
    given, produced = usage.get("input_tokens") or 0, usage.get("output_tokens") or 0
    return {"input_tokens": given, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": produced,
            "output_tokens_details": {"reasoning_tokens": usage.get("reasoning_tokens") or 0},
            "total_tokens": usage.get("total_tokens") or given + produced}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
                       ) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [{"type": "summary_text", "text": text}]}


def response_error(error: dict[str, Any]) -> dict[str, Any]:
    """A `ResponseError`: its `code` is one of OpenAI's (the SDK's enum), the message ours."""
    limited = error.get("status") == 429 or error.get("type") in ("rate_limited", "rate_limit_error")
    return {"code": "rate_limit_exceeded" if limited else "server_error",
            "message": str(error.get("message") or "the answer failed")}


def response_ending(ending: Ending) -> dict[str, Any]:
    """The status (and its details) of a response that ended so."""
    if ending.error is not None:
        return {"status": "failed", "error": response_error(ending.error)}
    if ending.finish_reason == "stopped":  # cancelled, or its reader left a direct stream
        return {"status": "cancelled"}
    if ending.finish_reason in INCOMPLETE_REASONS:
        return {"status": "incomplete", "incomplete_details": {"reason": INCOMPLETE_REASONS[ending.finish_reason]}}
    return {"status": "completed", "completed_at": int(time.time())}


class ResponseEvents:
    """OpenAI's Responses stream: semantic events numbered by `sequence_number` from 0.

    Each event is an SSE frame with `event:` = its type and no `id:` (OpenAI's SDKs resume
    by sequence number, `starting_after`). A log frame holds one or several events (the
    first text delta also opens its message item), and sequence numbers are written into
    the frames once, by the producer: every replay of the log numbers them alike.

    `response` is the Response object as the request made it (model, instructions, tools,
    …); this fills in id, status, output and usage. Reasoning summary events are written
    only when the request asked for a summary (`reasoning.summary`), as OpenAI does.
    """

    def __init__(self, response: dict[str, Any], summaries: bool = False) -> None:
        self.response = response
        self.summaries = summaries
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # the finished items
        self.open: dict[str, Any] | None = None  # the message or reasoning item being written
        self.written: list[str] = []  # its text so far

    def _event(self, kind: str, **data: Any) -> bytes:
        number, self.sequence = self.sequence, self.sequence + 1
        return encode_event(None, kind, {"type": kind, "sequence_number": number, **data})

    def _snapshot(self, **state: Any) -> dict[str, Any]:
        return {**self.response, "output": list(self.output), **state}

    def _item_id(self, kind: str) -> str:
        return response_item_id(kind, self.response["id"], len(self.output))

    def _add(self, item: dict[str, Any]) -> bytes:
        return self._event("response.output_item.added", output_index=len(self.output), item=item)

    def _done(self, item: dict[str, Any]) -> bytes:
        frame = self._event("response.output_item.done", output_index=len(self.output), item=item)
        self.output.append(item)
        return frame

    def _close(self, status: str = "completed") -> bytes:
        """Finish the open message or reasoning item with its whole text."""
        item, self.open = self.open, None
        if item is None:
            return b""
        text = "".join(self.written)
        where = {"item_id": item["id"], "output_index": len(self.output)}
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            return (self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
                    + self._event("response.content_part.done", **where, content_index=0, part=part)
                    + self._done(message_item(item["id"], text, status)))
        part = {"type": "summary_text", "text": text}
        return (self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text)
                + self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part)
                + self._done(reasoning_item(item["id"], text, status)))

    def _open(self, kind: str) -> tuple[bytes, str]:
        """Start a message or reasoning item (closing the other kind, if open), unless one of
        `kind` is open: the frames that start it, and its id."""
        if self.open is not None and self.open["type"] == kind:
            return b"", self.open["id"]
        frames = self._close()
        self.written = []
        where = {"output_index": len(self.output)}
        if kind == "message":
            item_id = self._item_id("msg")
            self.open = {"id": item_id, "type": "message"}
            return (frames + self._add({"id": item_id, "type": "message", "status": "in_progress",
                                        "role": "assistant", "content": []})
                    + self._event("response.content_part.added", item_id=item_id, **where, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []})), item_id
        item_id = self._item_id("rs")
        self.open = {"id": item_id, "type": "reasoning"}
        return (frames + self._add({"id": item_id, "type": "reasoning", "status": "in_progress", "summary": []})
                + self._event("response.reasoning_summary_part.added", item_id=item_id, **where,
                              summary_index=0, part={"type": "summary_text", "text": ""})), item_id

    def opening(self, stream_id: str, conversation_id: str, provider: str, model: str,
                request_id: str = "-") -> list[bytes]:
        # A stored response is found by its conversation; one that is not stored has none.
        self.response = {**self.response, "id": f"resp_{conversation_id or stream_id}"}
        created = "queued" if self.response.get("background") else "in_progress"
        return [self._event("response.created", response=self._snapshot(status=created)),
                self._event("response.in_progress", response=self._snapshot(status="in_progress"))]

    def text(self, text: str) -> bytes:
        frames, item_id = self._open("message")
        self.written.append(text)
        return frames + self._event("response.output_text.delta", item_id=item_id,
                                    output_index=len(self.output), content_index=0, delta=text, logprobs=[])

    def reasoning(self, text: str) -> bytes | None:
        if not self.summaries:
            return None  # OpenAI sends summaries only to a request that asks for them
        frames, item_id = self._open("reasoning")
        self.written.append(text)
        return frames + self._event("response.reasoning_summary_text.delta", item_id=item_id,
                                    output_index=len(self.output), summary_index=0, delta=text)

    def meta(self, data: dict[str, Any]) -> bytes | None:
        return None  # retries, failovers: nothing a Responses client expects

    def signed(self, item: Signed) -> bytes | None:
        return None  # kept with the stored answer: previous_response_id sends it back to its provider

    def tool_call(self, call: ToolCall) -> bytes | None:
        # Calls reach the relay whole: their arguments go out as one delta.
        frames = self._close()
        item_id = self._item_id("fc")
        where = {"item_id": item_id, "output_index": len(self.output)}
        return (frames + self._add(function_call_item(item_id, call.id, call.name, "", "in_progress"))
                + self._event("response.function_call_arguments.delta", **where, delta=call.arguments)
                + self._event("response.function_call_arguments.done", **where, name=call.name,
                              arguments=call.arguments)
                + self._done(function_call_item(item_id, call.id, call.name, call.arguments)))

    def closing(self, ending: Ending) -> list[bytes]:
        state = response_ending(ending)
        frames = [self._close("completed" if state["status"] == "completed" else "incomplete")]
        response = self._snapshot(**state, usage=response_usage(ending.usage))
        if state["status"] == "failed":
            # `error` is what the SDKs surface as the failure; `response.failed` ends the response.
            error = state["error"]
            frames.append(self._event("error", code=error["code"], message=error["message"], param=None))
            frames.append(self._event("response.failed", response=response))
        elif state["status"] == "completed":
            frames.append(self._event("response.completed", response=response))
        else:  # incomplete or cancelled: the SDKs' types have no event of its own for cancelled
            frames.append(self._event("response.incomplete", response=response))
        return [frame for frame in frames if frame]
