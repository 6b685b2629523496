"""The WebSocket transport (`/api/chat/ws`): the same events, as SSE frames in messages.

Offered under gunicorn, which hands the socket to the app and lets flask-sock end the
response cleanly. mod_wsgi gives no socket, and werkzeug's development server writes an
HTTP response after the WebSocket closes (browsers then drop the last frames), so there
`/api/capabilities` leaves it out and the JS client falls back.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from app.chat_request import parse_chat_request
from app.errors import ApiError
from app.sse import HEARTBEAT, encode_event

bp = Blueprint("websocket", __name__)
sock = Sock()


def websocket_offered(environ: dict) -> bool:
    return "gunicorn.socket" in environ


def _error_frame(type: str, message: str) -> str:
    return encode_event(None, "error", {"type": type, "message": message}).decode()


@sock.route("/api/chat/ws", bp=bp)
def chat_ws(ws) -> None:
    """First message: the JSON payload. Then frames until `done`/`error`; `{"type": "stop"}` stops."""
    service = current_app.extensions["llm_sse_relay"]
    heartbeat = service.settings.SSE_HEARTBEAT_SECONDS
    raw = ws.receive(timeout=max(heartbeat, 10))
    if raw is None:
        return
    from app.routes import start_generation

    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "the first message must be a JSON object")
        # Browsers cannot set headers on a WebSocket: the token may come in the first message.
        caller = service.access.caller(request, token=data.pop("access_token", None))
        service.access.count_request(caller)
        chat = parse_chat_request(data, service.settings, service.providers)
        generation = start_generation(chat, owner=caller.id)
    except ValueError:
        ws.send(_error_frame("invalid_json", "the first message is not valid JSON"))
        return
    except ApiError as err:
        ws.send(_error_frame(err.type, err.message))
        return
    generation.reader_joined()
    log = generation.log
    position, completed = 0, False
    try:
        while True:
            frames = log.wait(position, heartbeat)
            if frames:
                position += len(frames)
                ws.send(b"".join(frames).decode())
            elif log.closed and position == len(log.frames):
                completed = True
                break
            else:
                ws.send(HEARTBEAT.decode())
            message = ws.receive(timeout=0)
            if message and '"stop"' in message:
                generation.stop("stopped")
    except ConnectionClosed:
        pass
    finally:
        generation.reader_left(completed)
