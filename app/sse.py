"""Server-Sent Events framing and the WSGI response that carries it.

Framing lives here and nowhere else: `encode_event` turns one protocol event into
bytes once (the producer encodes, every reader just copies), `SseBody` is the WSGI
iterator that reads a `StreamLog` and writes heartbeats, and `sse_response` wraps
either into a Flask response with the headers every proxy in between needs.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Response, request

from app.gevent_native import native_poll

log = logging.getLogger("llm_sse_relay")

# Sent once at the start: how long EventSource waits before reconnecting (ms).
RETRY_MS = 3000
HEARTBEAT = b": ping\n\n"

SSE_HEADERS = {
    # no-transform stops proxies and CDNs from recompressing or rewriting the body.
    "Cache-Control": "no-cache, no-transform",
    # nginx (and anything that copies its convention) must not buffer this response.
    "X-Accel-Buffering": "no",
}

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def encode_json(data: Any) -> bytes:
    """JSON on one line as UTF-8; a lone surrogate (half an emoji) is \\u-escaped."""
    try:
        return _dumps(data).encode()
    except UnicodeEncodeError:
        # JSON.parse in the browser re-joins escaped surrogate halves across events.
        return _dumps_ascii(data).encode()


_event_names: set[bytes] = set()  # names already checked (a handful per app)


def event_name(event: str) -> bytes:
    """The `event:` field's value; a line break or NUL in it would start a forged field."""
    name = event.encode() if isinstance(event, str) else b""
    if name in _event_names:
        return name
    if not name or any(c in name for c in b"\r\n\x00") or len(name) > 200:
        raise ValueError(f"not a usable SSE event name: {event!r}")
    if len(_event_names) < 1024:
        _event_names.add(name)
    return name


def encode_event(event_id: int | None, event: str, data: Any) -> bytes:
    """One SSE event: `id:`, `event:` and a single `data:` line of JSON.

    JSON never contains a raw line break, so text with newlines or `data:` inside
    it cannot break the framing; the name is checked, the id is an integer.
    """
    name = event_name(event)
    if event_id is None:
        return b"event: %s\ndata: %s\n\n" % (name, encode_json(data))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, name, encode_json(data))


def encode_token(event_id: int, text: str) -> bytes:
    """The `token` event, the one sent thousands of times a second: formatted in one step."""
    return b"id: %d\nevent: token\ndata: %s\n\n" % (event_id, encode_json({"text": text}))


def encode_comment(text: str) -> bytes:
    """A comment frame; each line of `text` becomes its own `:` line."""
    lines = str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return b"".join(b": %s\n" % line.encode() for line in lines) + b"\n"


class StreamLog:
    """The in-process log of one stream's encoded frames.

    The producer appends frames and finally closes the log; any number of readers
    wait on it, each at its own position, so a reader never slows the producer and a
    late reader still gets every frame. `frames[i]` carries event id `i + 1`.
    """

    __slots__ = ("frames", "closed", "detached", "_waiters")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed = False
        # Set when this process is going away but the answer is not: readers end their
        # response without a last event and resume elsewhere (the draining worker in gunicorn.conf.py).
        self.detached = False
        self._waiters: list[threading.Event] = []

    # The per-token path. A Condition costs a lock round trip per append and an
    # ownership check per notify (slow under gevent); one-shot events cost nothing
    # when nobody waits. Safe without a lock: list appends are atomic, frames are
    # appended before waiters are woken, and a waiter re-checks after registering.
    def append(self, frame: bytes) -> None:
        self.frames.append(frame)
        if self._waiters:
            self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def detach(self) -> None:
        self.detached = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()

    def wait(self, position: int, timeout: float) -> list[bytes]:
        """Frames after `position`; waits up to `timeout` seconds when there are none."""
        frames = self.frames
        if len(frames) > position or self.closed:
            return frames[position:]
        # Nothing new (or a position beyond the log, which only a forged Last-Event-ID
        # can name): wait like any reader. Returning at once would make the caller spin.
        event = threading.Event()
        self._waiters.append(event)
        if len(frames) <= position and not self.closed:
            event.wait(timeout)
        return frames[position:]


def peer_closed(sock: socket.socket | None) -> bool:
    """True when the client has closed its side of the connection.

    An SSE client sends nothing after its request, so a readable socket that reads
    as EOF means it is gone. This lets a heartbeat tick notice a departed client
    without waiting for a write to fail (which takes a second write after the RST).
    """
    if sock is None:
        return False
    try:
        poller = native_poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        ready = poller.poll(0)
        if not ready:
            return False
        if ready[0][1] & (select.POLLHUP | select.POLLERR):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, ValueError):
        return False
    except OSError:
        return True


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The request's socket where the server exposes it (gunicorn, werkzeug; not mod_wsgi)."""
    return environ.get("gunicorn.socket") or environ.get("werkzeug.socket")


class SseBody:
    """WSGI iterator: `retry:`, then the log's frames as they come, heartbeats between.

    `close()` is called by every WSGI server when the response ends or the client
    goes away; `on_close` then tells the producer (e.g. to stop the upstream call).
    """

    def __init__(
        self,
        log: StreamLog,
        heartbeat: float,
        position: int = 0,
        on_close: Callable[[bool], None] | None = None,
        client_socket: socket.socket | None = None,
        retry: bool = True,
        keepalive: bytes = HEARTBEAT,
    ) -> None:
        self.log = log
        self.heartbeat = heartbeat
        self.position = position
        self.on_close = on_close
        self.client_socket = client_socket
        self.completed = False
        # The `retry:` field is for EventSource; clients of other SSE formats (OpenAI's SDKs)
        # take a frame with no data as an event and fail on it.
        self._started = not retry
        # What a heartbeat writes: a comment by default; an event for clients that take no
        # comment as a sign of life (Anthropic's SDKs skip comments and time out meanwhile).
        self.keepalive = keepalive
        self._closed = False

    def __iter__(self) -> SseBody:
        return self

    def __next__(self) -> bytes:
        if not self._started:
            self._started = True
            return b"retry: %d\n\n" % RETRY_MS
        log = self.log
        frames = log.wait(self.position, self.heartbeat)
        if frames:
            self.position += len(frames)
            return frames[0] if len(frames) == 1 else b"".join(frames)
        if log.closed:
            frames = log.frames[self.position :]  # appended just before close()
            if frames:
                self.position += len(frames)
                return b"".join(frames)
            self.completed = True
            raise StopIteration
        if getattr(log, "detached", False):
            raise StopIteration  # resume elsewhere: EventSource reconnects with Last-Event-ID
        if peer_closed(self.client_socket):
            raise StopIteration
        return self.keepalive

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            self.on_close(self.completed)


class EventStream:
    """A stream that application code pushes events into, for custom SSE routes.

    Push from any thread; `sse_response(stream)` serves it. `is_disconnected`
    turns true when the reader leaves, so the pushing code can stop working.
    """

    def __init__(self) -> None:
        self.log = StreamLog()
        self.is_disconnected = False
        self._next_id = 1
        # Taking an id and appending its frame is one step: ids reach the reader in order.
        self._lock = threading.Lock()

    def push(self, event: str, data: Any) -> int:
        with self._lock:
            event_id = self._next_id
            frame = encode_event(event_id, event, data)  # a bad name raises before the id is used
            self._next_id += 1
            self.log.append(frame)
        return event_id

    def comment(self, text: str) -> None:
        with self._lock:
            self.log.append(encode_comment(text))

    def finish(self, data: Any = None, event: str = "done") -> None:
        """Send the final event (`done` by default) and end the stream."""
        if data is not None:
            self.push(event, data)
        self.log.close()

    def _reader_left(self, completed: bool) -> None:
        if not completed:
            self.is_disconnected = True


def _log_from_events(events: Iterable[tuple[str, Any]], stream: EventStream) -> None:
    try:
        for event, data in events:
            if stream.is_disconnected:
                break
            stream.push(event, data)
    except Exception:  # the reader must get an `error` event, not a cut stream; details go to the log
        log.exception("events for an SSE response failed")
        stream.push("error", {"type": "internal_error", "message": "the server failed while streaming"})
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
        stream.finish()


def sse_response(
    events: EventStream | StreamLog | Iterable[tuple[str, Any]],
    heartbeat: float = 15.0,
    position: int = 0,
    on_close: Callable[[bool], None] | None = None,
    status: int = 200,
    retry: bool = True,
    headers: dict[str, str] | None = None,
    write_timeout: float | None = None,
    keepalive: bytes = HEARTBEAT,
) -> Response:
    """A Flask response that streams `events` as Server-Sent Events.

    `events` is an `EventStream`, a `StreamLog` (or an object with its `wait`
    and `closed`), or any iterable of
    `(event_name, data)` pairs (run in a background thread so heartbeats keep
    flowing while it is slow). `write_timeout`: seconds a write to the client may make no
    progress before the response is dropped (under gunicorn and werkzeug). `keepalive`: the
    frame each heartbeat writes (an encoded comment or event; default `: ping`).
    """
    if isinstance(events, StreamLog) or callable(getattr(events, "wait", None)):
        log = events  # a StreamLog, or anything with its wait()/closed (a log in the store)
    else:
        stream = events if isinstance(events, EventStream) else None
        if stream is None:
            stream = EventStream()
            threading.Thread(target=_log_from_events, args=(events, stream), daemon=True).start()
        log = stream.log
        user_close = on_close

        def on_close(completed: bool, stream: EventStream = stream) -> None:
            stream._reader_left(completed)
            if user_close is not None:
                user_close(completed)

    sock = client_socket(request.environ)
    if sock is not None and write_timeout:
        # gunicorn has no write timeout: a client that stops reading would hold this response
        # (and the answer its thread produces) forever. Apache has its own (`Timeout`).
        sock.settimeout(write_timeout)
    body = SseBody(log, heartbeat, position, on_close, sock, retry=retry, keepalive=keepalive)
    response = Response(
        body,
        status=status,
        content_type="text/event-stream; charset=utf-8",
        headers={**SSE_HEADERS, **(headers or {})},
        direct_passthrough=True,
    )
    return response
