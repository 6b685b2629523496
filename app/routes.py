"""The HTTP contract (DESIGN.md): chat streaming, REST fallback, health, the page."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, jsonify, render_template, request

from app.chat_request import ChatRequest, parse_chat_request
from app.errors import ApiError
from app.providers import ProviderError, offered
from app.relay import Generation, Relay, collect, new_id
from app.sse import sse_response

bp = Blueprint("relay", __name__)


def relay() -> Relay:
    return current_app.extensions["llm_sse_relay"]


def json_body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    return data


def chat_request(from_query: bool) -> ChatRequest:
    service = relay()
    data = request.args.to_dict() if from_query else json_body()
    return parse_chat_request(data, service.settings, service.providers, from_query=from_query)


def stream_generation(generation: Generation):
    """SSE response for a direct stream: its reader leaving stops the generation."""
    generation.reader_joined()
    return sse_response(generation.log, heartbeat=relay().settings.SSE_HEARTBEAT_SECONDS,
                        on_close=generation.reader_left)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/")
def index():
    service = relay()
    providers = {name: {"models": list(p.models), "default_model": p.default_model}
                 for name, p in service.providers.items() if offered(p)}
    return render_template("index.html", providers=providers, default_provider=service.settings.LLM_PROVIDER)


@bp.route("/api/chat/stream", methods=["GET", "POST"])
def chat_stream():
    chat = chat_request(from_query=request.method == "GET")
    generation = relay().start(chat.provider, chat.task, chat.conversation_id)
    return stream_generation(generation)


@bp.post("/api/chat")
def chat_rest():
    chat = chat_request(from_query=False)
    try:
        answer = collect(chat.provider, chat.task)
    except ProviderError as err:
        status = err.status if err.status and 400 <= err.status < 600 else 502
        # A provider's 401 is the server's misconfiguration, not the caller's fault.
        status = 502 if status in (401, 403) else status
        return jsonify(error={"type": err.type, "message": err.message, "status": err.status}), status
    return jsonify(
        id=new_id(),
        conversation_id=chat.conversation_id or new_id(),
        provider=chat.provider.name,
        model=chat.task.model,
        content=answer.text,
        finish_reason=answer.finish_reason,
        usage=answer.usage,
    )
