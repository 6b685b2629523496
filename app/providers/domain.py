"""What a provider is and what it yields, whatever its wire: the request (`Task`), the
normalized deltas of an answer, its errors (`ProviderError`), cancellation, and the
`Provider` interface. No I/O here: the HTTP call is app/providers/transport.py.

The deltas are the per-token objects of the whole relay: slotted dataclasses (no
`__dict__`, as cheap to build as a hand-written class with `__slots__`), dispatched on by
`delta.__class__ is Text`, never by `isinstance` chains.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from app.json_depth import MAX_DEPTH, json_nesting

# ---------------------------------------------------------------- normalized deltas


@dataclass(slots=True)
class Text:
    """A piece of answer text, exactly as the provider sent it."""

    text: str


@dataclass(slots=True)
class Reasoning:
    """A piece of the model's visible reasoning (thinking, or a reasoning summary), exactly as
    the provider sent it. Never part of the answer text: it goes out as its own event."""

    text: str


@dataclass(slots=True)
class Signed:
    """Reasoning state a provider requires back unchanged with the turn it belongs to:
    Anthropic `thinking` (with its `signature`) and `redacted_thinking` blocks, a Gemini
    `thoughtSignature` on a text part, an OpenAI Responses `reasoning` item. `item` is the
    provider's own JSON object, kept exactly as received; `provider` is the name of the
    provider that produced it: it is sent back to that provider only, and dropped (never
    forged) when the next turn goes to another one."""

    provider: str
    item: dict[str, Any]


@dataclass(slots=True, init=False)
class Usage:
    """Token counts so far: `input_tokens`, `output_tokens`, `total_tokens`, and
    `reasoning_tokens` (the part of the output spent thinking) only when the provider reports it."""

    usage: dict[str, int | None]

    def __init__(self, input_tokens: int | None, output_tokens: int | None, total: int | None = None,
                 reasoning_tokens: int | None = None) -> None:
        if total is None and input_tokens is not None and output_tokens is not None:
            total = input_tokens + output_tokens
        self.usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": total}
        if reasoning_tokens is not None:
            self.usage["reasoning_tokens"] = reasoning_tokens


@dataclass(slots=True)
class Finish:
    """Why the model stopped, normalized: stop, length, tool_calls, content_filter, …"""

    reason: str


@dataclass(slots=True)
class ToolCall:
    """A complete tool call the model asked for; `arguments` is the raw JSON text.

    `signature`, when set, is `{"provider": <provider name>, "value": <opaque text>}`: a
    signature the provider attached to this call (Gemini's `thoughtSignature`) that must go
    back unchanged, on the same call, in the next request to that provider, and to no other.
    """

    id: str
    name: str
    arguments: str
    signature: dict[str, str] | None = None


@dataclass(slots=True)
class Meta:
    """Anything else worth telling the reader (retries, rate limits) as a `meta` event."""

    data: dict[str, Any]


@dataclass(slots=True)
class Idle:
    """For the thread driving a stream (`Cancellation.idle_after` set), never otherwise:
    `WAITING`, the provider is about to block (what it produced may go out now), or `IDLE`,
    nothing arrived for `idle_after` seconds (time for a heartbeat). Carries nothing else."""

    silent: bool


WAITING = Idle(False)
IDLE = Idle(True)

Delta = Text | Reasoning | Signed | Usage | Finish | ToolCall | Meta | Idle


def parsed_arguments(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as an object (an invalid string becomes {}, and so does one nested
    past what any client may send: a model wrote it, and the parser must not recurse without bound)."""
    if json_nesting(arguments or "") > MAX_DEPTH:
        return {}
    try:
        value = json.loads(arguments or "{}")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- errors


class ProviderError(Exception):
    """An upstream failure, in the shape of the protocol's `error` event.

    `message` is ours and goes to clients; `detail` is what the upstream said (its error
    text, an in-stream error's type), which may name internal hosts or echo credentials: it
    goes to the log only (scrubbed there), never into an event, a body or a record.
    """

    def __init__(
        self,
        type: str,
        message: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.detail = detail

    @property
    def upstream_fault(self) -> bool:
        """Whether another provider may answer where this one failed: it could not be reached,
        timed out, broke off, was overloaded (429, 5xx, an in-stream server error). A refusal
        the request caused (400, 404, 422, a blocked prompt) or this server's credentials (401,
        403) would fail the same way elsewhere, or must not be routed around."""
        if self.status is not None:
            return self.status in (408, 429) or self.status >= 500
        return self.type in UPSTREAM_FAULTS or (self.type == "upstream_error" and self.retryable)

    def as_event(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.status is not None:
            data["status"] = self.status
        return data


# Failures of the connection or the stream itself, whoever the provider.
UPSTREAM_FAULTS = frozenset({"upstream_timeout", "upstream_unreachable", "upstream_disconnected",
                             "upstream_protocol_error"})


# ---------------------------------------------------------------- the request and its answer


@dataclass
class Task:
    """One normalized chat request, whatever the provider.

    `messages` are `{role, content}` with roles system, user and assistant, plus the
    provider-neutral form of tool exchanges that each adapter translates to its wire format:
    an assistant turn `{"role": "assistant", "content", "tool_calls": [{"id", "name",
    "arguments"}]}` (arguments as JSON text) and its results `{"role": "tool",
    "tool_call_id", "name", "content", "is_error"?}`. `tools` are `{name, description,
    parameters}`; `tool_choice` is "auto", "none", "required" or a tool's name.

    What today's models add (each adapter translates it, or leaves out what its wire lacks):
    - a user message's `content` may be a list of parts: `{"type": "text", "text"}` and
      `{"type": "image", "media_type", "data"}` (base64, already validated) or
      `{"type": "image", "url"}` (an https URL the relay never fetches itself);
    - an assistant turn may carry `"reasoning"` (its visible thinking, kept for the record,
      never sent back as text), `"signed": [{"provider", "item"}]` (the `Signed` deltas of
      that turn, in the order they came) and tool calls with a `"signature"` (see
      `ToolCall`); an adapter sends back only what its own provider name produced;
    - `reasoning` is the requested effort: "low", "medium", "high" or None (the provider's
      default, usually no visible reasoning).
    """

    messages: list[dict[str, Any]]
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | None = None
    stop: list[str] = field(default_factory=list)
    reasoning: str | None = None


class Cancellation:
    """Stops a generation from any thread: sets a flag and runs the registered aborts.

    `idle_after`, when set, asks the provider not to block longer than that: while it waits
    (for response headers, a retry, the next bytes) it yields `IDLE` every `idle_after`
    seconds, so the reader's own thread can drive the stream and still send heartbeats.
    """

    def __init__(self, idle_after: float | None = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None
        self.idle_after = idle_after

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # an abort that fails must not stop the others
                pass

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` on cancel (now, if already cancelled); returns an unregister."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._discard(callback)
        callback()
        return lambda: None

    def _discard(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


class Provider:
    """A source of answers. `stream(task, cancel)` yields deltas until done."""

    name = "provider"
    default_model = ""
    models: tuple[str, ...] = ()
    # Whether the provider takes an image by its https URL (fetching it itself); one that does
    # not gets images as bytes only, and a URL is refused before the call (app/images.py).
    takes_image_urls = True
    # Whether a final assistant turn is continued as is (Anthropic's prefill): failover then
    # hands the answer so far over as that turn, with no instruction to continue it.
    supports_prefill = False

    def attempt(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        """One call, no retries (what failover and a request's retry budget build on)."""
        return self.stream(task, cancel)

    @property
    def configured(self) -> bool:
        return True

    @property
    def idles(self) -> bool:
        """True when, with `cancel.idle_after` set, `stream` yields `WAITING` before it blocks
        and `IDLE` at least every `idle_after` seconds while blocked: then a reader's thread
        may drive it."""
        return False

    def stream(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        raise NotImplementedError


def idle_wait(cancel: Cancellation, seconds: float) -> Generator[Idle, None, bool]:
    """Wait `seconds` unless cancelled (returns True then). With `idle_after` set: `WAITING`
    first, then `IDLE` every `idle_after` seconds of the wait."""
    deadline = time.monotonic() + seconds
    if cancel.idle_after is not None:
        yield WAITING
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if cancel.wait(left if cancel.idle_after is None else min(left, cancel.idle_after)):
            return True
        if cancel.idle_after is not None and deadline - time.monotonic() > 0:
            yield IDLE


def system_text(task: Task) -> str | None:
    """For APIs with one top-level system prompt (Anthropic, Gemini): the task's system prompt
    and any system messages, joined."""
    parts = ([task.system] if task.system else []) + [m["content"] for m in task.messages if m.get("role") == "system"]
    return "\n\n".join(parts) or None
