"""The WebSocket transport (`/api/chat/ws`): the same events, as SSE frames in messages.

Offered under gunicorn, which hands the socket to the app and lets flask-sock end the
response cleanly. mod_wsgi gives no socket, and werkzeug's development server writes an
HTTP response after the WebSocket closes (browsers then drop the last frames), so there
`/api/capabilities` leaves it out and the JS client falls back.

Protocol: the first message is the JSON payload (with `access_token` when auth is on:
browsers cannot set headers on a WebSocket); then the server sends frames until `done`
or `error`. A message `{"type": "stop"}` from the client stops the answer at once.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
from collections.abc import Callable

from flask import Blueprint, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server

from app.errors import ApiError, store_busy
from app.gevent_native import native_poll
from app.request_body import parse_json_object
from app.routes import chat_service
from app.sse import SseBody, encode_event
from app.store import StoreError

log = logging.getLogger("llm_sse_relay")

bp = Blueprint("websocket", __name__)
sock = Sock()


def _error_frame(type: str, message: str) -> str:
    return encode_event(None, "error", {"type": type, "message": message}).decode()


def _is_stop(message: str | bytes | None) -> bool:
    try:
        data = json.loads(message) if message else None
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("type") == "stop"


def _watch_for_stop(ws: Server, stop: Callable[[], None]) -> None:
    """Read the client's messages while the answer streams: a stop acts at once, even while
    the upstream is silent (the sending loop may be waiting a whole heartbeat)."""
    try:
        while ws.connected:
            message = ws.receive(timeout=None)
            if _is_stop(message):
                stop()
                return
    except ConnectionClosed:
        pass


class SendTimeout(Exception):
    """The client read nothing for CLIENT_WRITE_TIMEOUT seconds."""


class Sender:
    """`ws.send`, given up when the client has read nothing for `timeout` seconds.

    The stream's thread also produces it, and gunicorn's sockets have no write timeout: a
    client that stops reading would hold it, the upstream connection and a stream slot for
    ever. A socket timeout would also end the idle reads of the stop watcher, so the send
    alone waits for room. Per token that is one zero-timeout poll; only a full socket waits,
    with `select.poll` (gevent's, under gevent: the other streams run meanwhile).
    """

    def __init__(self, ws: Server, timeout: float | None) -> None:
        self.ws = ws
        self.timeout = timeout
        self._room = native_poll()
        self._room.register(ws.sock, select.POLLOUT)

    def send(self, text: str) -> None:
        if self.timeout and not self._room.poll(0) and not self._room_within(self.timeout):
            raise SendTimeout
        self.ws.send(text)

    def _room_within(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self.ws.sock, select.POLLOUT)
        return bool(poller.poll(timeout * 1000))


@sock.route("/api/chat/ws", bp=bp)  # type: ignore[untyped-decorator]  # flask-sock has no type hints
def chat_ws(ws: Server) -> None:
    service = chat_service()
    heartbeat = service.settings.SSE_HEARTBEAT_SECONDS
    raw = ws.receive(timeout=max(heartbeat, 10))
    if raw is None:
        return
    try:
        data = parse_json_object(raw, "the first message")
        caller = service.access.caller(request, token=data.pop("access_token", None))
        reading = service.stream(caller, service.accept(caller, data), transport="ws")
    except (ApiError, StoreError) as exc:
        err = exc if isinstance(exc, ApiError) else store_busy(exc, service.metrics)
        ws.send(_error_frame(err.type, err.message))
        return
    threading.Thread(target=_watch_for_stop, args=(ws, reading.stop), daemon=True).start()
    # The same iterator as every SSE response: frames as they come, heartbeats between.
    body = SseBody(reading.log, heartbeat, reading.position, reading.on_close)
    sender = Sender(ws, service.settings.CLIENT_WRITE_TIMEOUT)
    try:
        for chunk in body:
            sender.send(chunk.decode())
    except ConnectionClosed:
        pass
    except SendTimeout:
        log.info("websocket client read nothing for %g s: dropped", sender.timeout)
        # Not ws.close(): its close frame would wait for the same room. A shut socket ends
        # the connection's reader thread, and any later send fails at once.
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    finally:
        body.close()
