"""The HTTP contract (docs/http-api.md): chat streaming, REST fallback, health, the page.

Views are thin: they read the request, call the front door (`app.service.ChatService`)
with the caller, and shape what it returns into a response.
"""

from __future__ import annotations

import hmac
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request

from app.access import Caller
from app.errors import ApiError
from app.request_body import parse_json_object
from app.service import ChatService, Reading
from app.websocket import websocket_offered

bp = Blueprint("relay", __name__)


def service() -> ChatService:
    return current_app.extensions["llm_sse_relay"]


def caller() -> Caller:
    return g.caller


def json_body() -> dict[str, Any]:
    """The request's JSON object. `application/json` is required: a form or `text/plain` POST
    is what any web page can send cross-site without a CORS preflight."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    return parse_json_object(request.get_data(cache=False))


def sse(reading: Reading) -> Response:
    return service().sse(reading)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/metrics")
def metrics():
    """Prometheus text format, summed over every process of this server (app/metrics.py)."""
    relay = service()
    token = relay.settings.METRICS_TOKEN
    if token:  # its own credential, for a Prometheus that holds no API token
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "/metrics needs METRICS_TOKEN as a bearer token",
                           {"WWW-Authenticate": "Bearer"})
    else:
        relay.access.caller(request)  # like the API: 401 when auth is on and the token is missing
    body, content_type = relay.metrics.exposition()
    return Response(body, content_type=content_type)


def capabilities_of_this_server() -> dict[str, Any]:
    relay = service()
    transports = ["postsse", "fetch", "sse", "rest"]
    if websocket_offered(request.environ):
        transports.append("ws")
    providers = {name: {"models": list(p.models), "default_model": p.default_model}
                 for name, p in relay.providers.items() if p.configured}
    return {"transports": transports, "providers": providers, "default_provider": relay.settings.LLM_PROVIDER,
            "auth": relay.access.enabled, "max_url_bytes": relay.settings.MAX_URL_BYTES}


@bp.get("/api/capabilities")
def capabilities():
    """What this server offers: transports (no WebSocket under mod_wsgi) and providers."""
    return jsonify(capabilities_of_this_server())


@bp.get("/")
def index():
    response = Response(render_template("index.html", capabilities=capabilities_of_this_server()))
    # The page renders model output as DOM nodes only; the policy is the second wall: no
    # inline script, no other origins, no framing by other sites.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'")
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.route("/api/chat/stream", methods=["GET", "POST"])
def chat_stream():
    if request.method == "GET":
        data = request.args.to_dict()
        data.pop("access_token", None)
        chat = service().accept(caller(), data, from_query=True)
    else:
        chat = service().accept(caller(), json_body())
    return sse(service().stream(caller(), chat, transport="sse" if request.method == "GET" else "fetch"))


@bp.post("/api/chat/streams")
def create_stream():
    """POST-SSE step 1: validate and keep the request; the stream starts when opened."""
    chat = service().accept(caller(), json_body())
    return jsonify(service().create_ticket(caller(), chat)), 201


@bp.get("/api/chat/streams/<stream_id>")
def open_stream(stream_id: str):
    """POST-SSE step 2, from any worker or host; resumes after Last-Event-ID."""
    last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    reader = g.caller.id if g.caller is not None else service().access.client_id(request)
    reading = service().open_stream(g.caller, stream_id, last, reader)
    if reading is None:
        return Response(status=204)  # finished and the reader has it all: EventSource stops here
    return sse(reading)


@bp.delete("/api/chat/streams/<stream_id>")
def stop_stream(stream_id: str):
    service().stop_stream(caller(), stream_id)
    return jsonify(id=stream_id, status="stopped")


@bp.post("/api/chat")
def chat_rest():
    chat = service().accept(caller(), json_body())
    # A ProviderError is answered by the app's handler (app/errors.py), as on /v1.
    request_id, conversation_id, answer = service().answer(caller(), chat)
    return jsonify(
        id=request_id,
        conversation_id=conversation_id,
        provider=chat.provider.name,
        model=chat.task.model,
        content=answer.text,
        reasoning=answer.reasoning_text or None,
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        tools=answer.tool_records,
    )


@bp.get("/api/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    """The stored records of a conversation, in order (tool calls inside the answers)."""
    return jsonify(id=conversation_id, messages=service().conversation(caller(), conversation_id))


@bp.delete("/api/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    service().forget_conversation(caller(), conversation_id)
    return jsonify(id=conversation_id, deleted=True)
