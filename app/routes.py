"""The HTTP contract (docs/http-api.md): chat streaming, REST fallback, health, the page.

Views are thin: they read the request, call the front door (`app.service.ChatService`)
with the caller, and shape what it returns into a response.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request

from app.access import Caller
from app.errors import ApiError
from app.request_body import parse_json_object
from app.service import ChatService

# Each blueprint is one kind of access, decided by its own hooks (app.access.guard, wired by
# the factory): the page and health check are open; what the server offers is open to every
# origin; /metrics has its own credential; the chat API needs a caller; a stream URL is a
# capability (its id is the credential).
pages = Blueprint("pages", __name__, template_folder="templates")  # found from any app (init_app)
offer = Blueprint("offer", __name__)
metrics_bp = Blueprint("metrics", __name__)
api = Blueprint("chat", __name__)
stream_urls = Blueprint("stream_urls", __name__)

# The app's ChatService, in `app.extensions` under this name.
EXTENSION = "llm_sse_relay"


def chat_service() -> ChatService:
    """The front door of the app handling this request."""
    service: ChatService = current_app.extensions[EXTENSION]
    return service


def caller() -> Caller:
    """The caller the blueprint's hook identified (app.access.guard)."""
    known: Caller = g.caller
    return known


def json_body() -> dict[str, Any]:
    """The request's JSON object. `application/json` is required: a form or `text/plain` POST
    is what any web page can send cross-site without a CORS preflight."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json")
    return parse_json_object(request.get_data(cache=False))


@pages.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@metrics_bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, summed over every process of this server (app/metrics.py);
    its blueprint's hook checks the credential (app.access.guard_metrics)."""
    body, content_type = chat_service().metrics.exposition()
    return Response(body, content_type=content_type)


def capabilities_of_this_server() -> dict[str, Any]:
    service = chat_service()
    transports = ["postsse", "fetch", "sse", "rest"]
    if "gunicorn.socket" in request.environ:  # the WebSocket needs the socket (app/websocket.py)
        transports.append("ws")
    providers = {name: {"models": list(p.models), "default_model": p.default_model}
                 for name, p in service.providers.items() if p.configured}
    return {"transports": transports, "providers": providers, "default_provider": service.settings.LLM_PROVIDER,
            "auth": service.access.enabled, "max_url_bytes": service.settings.MAX_URL_BYTES}


@offer.get("/api/capabilities")
def capabilities() -> Response:
    """What this server offers: transports (no WebSocket under mod_wsgi) and providers."""
    return jsonify(capabilities_of_this_server())


@pages.get("/")
def index() -> Response:
    response = Response(render_template("index.html", capabilities=capabilities_of_this_server()))
    # The page renders model output as DOM nodes only; the policy is the second wall: no
    # inline script, no other origins, no framing by other sites.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'")
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@api.route("/api/chat/stream", methods=["GET", "POST"])
def chat_stream() -> Response:
    service = chat_service()
    if request.method == "GET":
        data = request.args.to_dict()
        data.pop("access_token", None)
        chat = service.accept(caller(), data, from_query=True)
    else:
        chat = service.accept(caller(), json_body())
    return service.sse(service.stream(caller(), chat, transport="sse" if request.method == "GET" else "fetch"))


@api.post("/api/chat/streams")
def create_stream() -> tuple[Response, int]:
    """POST-SSE step 1: validate and keep the request; the stream starts when opened."""
    service = chat_service()
    chat = service.accept(caller(), json_body())
    return jsonify(service.create_ticket(caller(), chat)), 201


@stream_urls.get("/api/chat/streams/<stream_id>")
def open_stream(stream_id: str) -> Response:
    """POST-SSE step 2, from any worker or host; resumes after Last-Event-ID."""
    service = chat_service()
    last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    reader = g.caller.id if g.caller is not None else service.access.client_id(request)
    reading = service.open_stream(g.caller, stream_id, last, reader)
    if reading is None:
        return Response(status=204)  # finished and the reader has it all: EventSource stops here
    return service.sse(reading)


@api.delete("/api/chat/streams/<stream_id>")
def stop_stream(stream_id: str) -> Response:
    service = chat_service()
    service.stop_stream(caller(), stream_id)
    return jsonify(id=stream_id, status="stopped")


@api.post("/api/chat")
def chat_rest() -> Response:
    service = chat_service()
    chat = service.accept(caller(), json_body())
    # A ProviderError is answered by the app's handler (app/errors.py), as on /v1.
    request_id, conversation_id, answer = service.answer(caller(), chat)
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


@api.get("/api/conversations/<conversation_id>")
def get_conversation(conversation_id: str) -> Response:
    """The stored records of a conversation, in order (tool calls inside the answers)."""
    service = chat_service()
    return jsonify(id=conversation_id, messages=service.conversation(caller(), conversation_id))


@api.delete("/api/conversations/<conversation_id>")
def delete_conversation(conversation_id: str) -> Response:
    service = chat_service()
    service.forget_conversation(caller(), conversation_id)
    return jsonify(id=conversation_id, deleted=True)
