"""The relay: provider deltas -> protocol events in a stream log, read by SSE responses.

A `Generation` is one answer being produced. Its producer (one thread, or greenlet
under gevent) calls the provider and appends encoded events to a `StreamLog`; SSE
responses read that log at their own pace. The producer never waits for a reader, a
reader never calls the model, and a stream's fate (stopped, reader gone, done) is
decided in one place: the `Cancellation` the producer watches.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.providers.base import Cancellation, Finish, Meta, Provider, ProviderError, Task, Text, ToolCall, Usage
from app.sse import StreamLog, encode_event, encode_json

log = logging.getLogger("llm_sse_relay.stream")


def new_id() -> str:
    """An unguessable id (128 random bits), URL-safe."""
    return secrets.token_urlsafe(16)


@dataclass
class Answer:
    """What a generation produced so far; the same record for streamed and REST answers."""

    parts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    outcome: str = "running"  # done | error | stopped | abandoned
    error: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Generation:
    """One answer in production: its provider call, stream log and readers."""

    def __init__(self, provider: Provider, task: Task, conversation_id: str,
                 on_end: Callable[[Generation], None] | None = None, stream_id: str | None = None) -> None:
        self.id = stream_id or new_id()
        self.provider = provider
        self.task = task
        self.conversation_id = conversation_id
        self.log = StreamLog()
        self.cancel = Cancellation()
        self.answer = Answer()
        self.on_end = on_end
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.token_events = 0
        self.readers = 0
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self) -> Generation:
        threading.Thread(target=self.run, name=f"relay-{self.id[:8]}", daemon=True).start()
        return self

    def stop(self, reason: str = "stopped") -> None:
        """End the generation now: the upstream socket is shut, readers get the end."""
        self.cancel.cancel(reason)

    def reader_joined(self) -> None:
        with self._lock:
            self.readers += 1

    def reader_left(self, completed: bool) -> None:
        """A direct stream's only reader left before the end: nobody pays for the rest."""
        with self._lock:
            self.readers -= 1
            last = self.readers == 0
        if last and not completed and not self.log.closed:
            self.stop("abandoned")

    # -- the producer
    def run(self) -> None:
        append = self.log.append
        answer = self.answer
        parts = answer.parts
        provider = self.provider
        append(encode_event(1, "msgid", {"id": self.id, "conversation_id": self.conversation_id,
                                          "provider": provider.name, "model": self.task.model}))
        next_id = 2
        try:
            for delta in provider.stream(self.task, self.cancel):
                kind = delta.__class__
                if kind is Text:  # the hot path: one encode, one append
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    parts.append(delta.text)
                    append(b"id: %d\nevent: token\ndata: %s\n\n" % (next_id, encode_json({"text": delta.text})))
                    next_id += 1
                elif kind is Usage:
                    answer.usage = delta.usage
                elif kind is Finish:
                    answer.finish_reason = delta.reason
                elif kind is ToolCall:
                    answer.tool_calls.append(delta)
                elif kind is Meta:
                    append(encode_event(next_id, "meta", delta.data))
                    next_id += 1
            if self.cancel.is_set():
                answer.outcome = self.cancel.reason or "stopped"
                answer.finish_reason = "stopped"
                append(encode_event(next_id, "done", {"finish_reason": "stopped", "usage": answer.usage}))
            else:
                answer.outcome = "done"
                finish = answer.finish_reason or "stop"
                if answer.usage is not None or answer.finish_reason is not None:
                    append(encode_event(next_id, "meta", {"usage": answer.usage, "finish_reason": finish}))
                    next_id += 1
                append(encode_event(next_id, "done", {"finish_reason": finish, "usage": answer.usage}))
        except ProviderError as err:
            answer.outcome, answer.error = "error", err.as_event()
            append(encode_event(next_id, "error", answer.error))
        except Exception:
            log.exception("stream %s failed", self.id)
            answer.outcome = "error"
            answer.error = {"type": "internal_error", "message": "the relay failed while streaming this answer"}
            append(encode_event(next_id, "error", answer.error))
        finally:
            self.token_events = len(parts)
            self.log.close()
            self._log_line()
            if self.on_end is not None:
                try:
                    self.on_end(self)
                except Exception:
                    log.exception("stream %s: end hook failed", self.id)

    def _log_line(self) -> None:
        now = time.monotonic()
        ttft = "-" if self.first_token_at is None else f"{(self.first_token_at - self.started) * 1000:.0f}"
        log.info(
            "stream id=%s provider=%s model=%s ttft_ms=%s tokens=%d duration_ms=%.0f outcome=%s%s",
            self.id, self.provider.name, self.task.model, ttft, self.token_events,
            (now - self.started) * 1000, self.answer.outcome,
            f" error={self.answer.error['type']}" if self.answer.error else "",
        )


def collect(provider: Provider, task: Task, cancel: Cancellation | None = None) -> Answer:
    """Run a generation to the end without a stream log (the REST route, `ask()`).

    Same deltas, same accumulation as the streamed path, so the text is identical.
    """
    answer = Answer()
    cancel = cancel or Cancellation()
    for delta in provider.stream(task, cancel):
        kind = delta.__class__
        if kind is Text:
            answer.parts.append(delta.text)
        elif kind is Usage:
            answer.usage = delta.usage
        elif kind is Finish:
            answer.finish_reason = delta.reason
        elif kind is ToolCall:
            answer.tool_calls.append(delta)
    answer.outcome = "done"
    answer.finish_reason = answer.finish_reason or "stop"
    return answer


class Relay:
    """The app's relay service: settings, providers and the generations in this process."""

    def __init__(self, settings: Any, providers: dict[str, Provider]) -> None:
        self.settings = settings
        self.providers = providers
        self.generations: dict[str, Generation] = {}
        self._lock = threading.Lock()

    def start(self, provider: Provider, task: Task, conversation_id: str | None) -> Generation:
        """Start producing an answer now; readers attach to `generation.log`."""
        generation = Generation(provider, task, conversation_id or new_id(), on_end=self._ended)
        with self._lock:
            self.generations[generation.id] = generation
        return generation.start()

    def _ended(self, generation: Generation) -> None:
        with self._lock:
            self.generations.pop(generation.id, None)
