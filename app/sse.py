"""Server-Sent Events: the one place that writes (and reads back) the event-stream format,
the stream log, and the WSGI response that carries it.

`ServerSentEvent` is the one event type: its `encode()` writes every field (comment, id,
event, data split on line breaks, retry), as sse-starlette's does, and every frame this
server sends is made by it, whatever wire format the stream speaks (app/protocols.py).
A producer encodes each event once; every reader just copies bytes. `read_events` parses
frames back (a producer continuing a stored stream). `SseBody` is the WSGI iterator that
reads a `FrameLog` and writes heartbeats, and `sse_response` wraps either into a Flask
response with the headers every proxy in between needs.
"""

from __future__ import annotations

import json
import json.encoder
import logging
import select
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeGuard

from flask import Response, request

from app.decoders import SseDecoder, SseEvent
from app.gevent_native import native_poll

logger = logging.getLogger("llm_sse_relay")

# Sent once at the start: how long EventSource waits before reconnecting (ms).
RETRY_MS = 3000

SSE_HEADERS = {
    # no-transform stops proxies and CDNs from recompressing or rewriting the body.
    "Cache-Control": "no-cache, no-transform",
    # nginx (and anything that copies its convention) must not buffer this response.
    "X-Accel-Buffering": "no",
}


def _one_line_json(ensure_ascii: bool) -> Callable[[Any], str]:
    """JSON on one line, as `json.JSONEncoder(separators=(",", ":")).encode` writes it.

    That method builds a new C encoder for every value (its check for circular references
    keeps per-call state): 0.55 µs of the 0.9 µs a token's JSON took, measured. Built once
    without that check (a cycle, which nothing here builds, ends in RecursionError instead),
    the C encoder is reused; checked once against the public method, which stays the way
    when the C accelerator is missing or writes otherwise.
    """
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=(",", ":"))
    make_encoder = getattr(json.encoder, "c_make_encoder", None)  # CPython's accelerator (not in typeshed)
    if make_encoder is None:
        return encoder.encode
    quote = json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    # The arguments JSONEncoder.iterencode passes: no markers (no circular check), no indent.
    chunks = make_encoder(None, encoder.default, quote, None, ":", ",", False, False, True)

    def encode(data: Any) -> str:
        return "".join(chunks(data, 0))

    sample = {"text": "é \n\u2028\"", "n": [1, -2.5, None, True], "nested": {"list": []}}
    try:
        return encode if encode(sample) == encoder.encode(sample) else encoder.encode
    except Exception:
        return encoder.encode


_dumps = _one_line_json(ensure_ascii=False)
_dumps_ascii = _one_line_json(ensure_ascii=True)


def encode_json(data: Any) -> bytes:
    """JSON on one line as UTF-8; a lone surrogate (half an emoji) is \\u-escaped."""
    try:
        return _dumps(data).encode()
    except UnicodeEncodeError:
        # JSON.parse in the browser re-joins escaped surrogate halves across events.
        return _dumps_ascii(data).encode()


_checked_names: dict[str, bytes] = {}  # names already checked: a handful per app, one per token


def event_name(event: str) -> bytes:
    """The `event:` field's value; a line break or NUL in it would start a forged field."""
    name = _checked_names.get(event) if isinstance(event, str) else None
    if name is not None:
        return name
    if not isinstance(event, str) or not event or "\n" in event or "\r" in event or "\0" in event:
        raise ValueError(f"not a usable SSE event name: {event!r}")
    name = event.encode()  # a lone surrogate cannot be: a ValueError too
    if len(name) > 200:
        raise ValueError(f"not a usable SSE event name: {event!r}")
    if len(_checked_names) < 1024:
        _checked_names[event] = name
    return name


# Line breaks as bytes values: `LF in data` is a memchr, where a bytes needle takes 4x as long
# (measured), and every event's data is looked at.
LF, CR = ord("\n"), ord("\r")


def _lines(text: bytes) -> list[bytes]:
    """`text` cut on CRLF, LF or lone CR: the line breaks of the event-stream format."""
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


class ServerSentEvent:
    """One event of the event-stream format; `encode()` writes every field (sse-starlette's
    `ServerSentEvent`).

    `data` is the payload as bytes (JSON from `encode_json`, or a sentinel such as
    `[DONE]`), written as one `data:` line per line of it; `comment` lines come first (readers
    skip them), then `id`, the checked `event` name, the data and `retry`. The id and retry are
    integers and the name is checked, so no field can spill into another.
    """

    __slots__ = ("data", "event", "id", "retry", "comment")

    def __init__(self, data: bytes | None = None, event: str | None = None, id: int | None = None,
                 retry: int | None = None, comment: str | None = None) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comment = comment

    def encode(self) -> bytes:
        data, event, event_id = self.data, self.event, self.id
        if data is not None and self.comment is None and self.retry is None and LF not in data and CR not in data:
            # One data line (JSON has no raw line break): the shape of every event but the
            # stream's first (`retry`) and its comments, formatted in one step; tokens go here.
            if event is None:
                return b"data: %s\n\n" % data if event_id is None else b"id: %d\ndata: %s\n\n" % (event_id, data)
            if event_id is None:
                return b"event: %s\ndata: %s\n\n" % (event_name(event), data)
            return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event_name(event), data)
        fields = [] if self.comment is None else [b": %s\n" % line for line in _lines(self.comment.encode())]
        if event_id is not None:
            fields.append(b"id: %d\n" % event_id)
        if event is not None:
            fields.append(b"event: %s\n" % event_name(event))
        if data is not None:
            fields += [b"data: %s\n" % line for line in _lines(data)]
        if self.retry is not None:
            fields.append(b"retry: %d\n" % self.retry)
        fields.append(b"\n")
        return b"".join(fields)


# The end of an OpenAI-style stream (chat chunks, the AI SDK's UI message stream).
DONE = ServerSentEvent(b"[DONE]").encode()
# A comment: every reader skips it, every proxy sees bytes flowing.
HEARTBEAT = ServerSentEvent(comment="ping").encode()
# Opens every EventSource response (see RETRY_MS).
RETRY = ServerSentEvent(retry=RETRY_MS).encode()


def encode_event(event_id: int | None, event: str, data: Any) -> bytes:
    """One named event with `data` as JSON, on one `data:` line (JSON never contains a raw
    line break, so text with newlines or `data:` inside it cannot break the framing)."""
    return ServerSentEvent(encode_json(data), event, event_id).encode()


def encode_data(data: Any) -> bytes:
    """An unnamed event (a client reads it as `message`) with `data` as JSON: OpenAI's chunks."""
    return ServerSentEvent(encode_json(data)).encode()


def encode_comment(text: str) -> bytes:
    """A comment frame; each line of `text` becomes its own `:` line."""
    return ServerSentEvent(comment=str(text)).encode()


def read_events(frames: Iterable[bytes]) -> list[SseEvent]:
    """The events that frames written here carry, parsed as any event-stream reader does
    (a log read back from the store, to continue the answer it holds)."""
    decoder = SseDecoder()
    return decoder.decode(b"".join(frames)) + decoder.flush()


class FrameLog(Protocol):
    """What an SSE body reads: a log of encoded frames (`StreamLog`, the relay's `DrivenLog`,
    a log in the store read through `StoreLogView`)."""

    @property
    def frames(self) -> list[bytes]: ...

    @property
    def closed(self) -> bool: ...

    @property
    def detached(self) -> bool: ...

    def wait(self, position: int, timeout: float) -> list[bytes]:
        """Frames after `position`; waits up to `timeout` seconds when there are none."""
        ...


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
        log: FrameLog,
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
            return RETRY
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
        if log.detached:
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
        logger.exception("events for an SSE response failed")
        stream.push("error", {"type": "internal_error", "message": "the server failed while streaming"})
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
        stream.finish()


def _is_frame_log(events: object) -> TypeGuard[FrameLog]:
    """Anything with a `wait` is read as a log (a `StreamLog`, a relay's, one in the store)."""
    return callable(getattr(events, "wait", None))


def sse_response(
    events: EventStream | FrameLog | Iterable[tuple[str, Any]],
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

    `events` is an `EventStream`, a `FrameLog` (a `StreamLog`, or an object with its
    `wait`, `frames`, `closed` and `detached`), or any iterable of
    `(event_name, data)` pairs (run in a background thread so heartbeats keep
    flowing while it is slow). `write_timeout`: seconds a write to the client may make no
    progress before the response is dropped (under gunicorn and werkzeug). `keepalive`: the
    frame each heartbeat writes (an encoded comment or event; default `: ping`).
    """
    log: FrameLog
    if _is_frame_log(events):
        log = events
    else:
        if isinstance(events, EventStream):
            stream = events
        else:
            stream = EventStream()
            threading.Thread(target=_log_from_events, args=(events, stream), daemon=True).start()
        log = stream.log
        user_close = on_close

        def reader_left(completed: bool) -> None:
            stream._reader_left(completed)
            if user_close is not None:
                user_close(completed)

        on_close = reader_left

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
