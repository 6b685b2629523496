"""The HTTP contract (DESIGN.md): chat streaming, REST fallback, health, the page."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request

from app.chat_request import ID_PATTERN, ChatRequest, parse_chat_request
from app.conversations import Conversations
from app.errors import ApiError
from app.providers import ProviderError, offered
from app.providers.base import Task
from app.relay import Answer, Generation, Relay, StoreLogView, collect, new_id
from app.sse import sse_response
from app.websocket import websocket_offered

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
    """The request's chat options, validated; counts against the caller's rate limit."""
    service = relay()
    service.access.count_request(g.caller)
    data = request.args.to_dict() if from_query else json_body()
    data.pop("access_token", None)
    return parse_chat_request(data, service.settings, service.providers, from_query=from_query)


def caller_id() -> str:
    caller = g.get("caller")
    return caller.id if caller is not None else f"ip:{request.remote_addr}"


def require_owner(owner: str | None) -> None:
    """A stream is bound to its creator: with auth on, only they may stop or read it by token."""
    caller = g.get("caller")
    if relay().access.enabled and caller is not None and owner is not None and caller.id != owner:
        raise ApiError(403, "forbidden", "this stream belongs to another client")


def conversations() -> Conversations:
    service = relay()
    return Conversations(service.store, service.settings)


def start_generation(chat: ChatRequest, stream_id: str | None = None, resumable: bool = False,
                     prepared: tuple[str, Task] | None = None, owner: str | None = None) -> Generation:
    """Start a chat's answer, with its conversation: history in, the answer recorded after.

    Takes one of the caller's open-stream slots (429 when none is left) until it ends.
    """
    service = relay()
    owner = owner or caller_id()
    stream_id = stream_id or new_id()
    service.access.open_stream(owner, stream_id)
    memory = conversations()
    try:
        conversation_id, task = prepared or memory.begin(chat, stream_id)
    except Exception:
        service.access.close_stream(owner, stream_id)
        raise

    def record(generation: Generation) -> None:
        try:
            memory.finish(generation.conversation_id, generation.id, generation.answer,
                          generation.answer.tool_records)
        finally:
            service.access.close_stream(owner, generation.id)

    return service.start(chat.provider, task, conversation_id, stream_id=stream_id, resumable=resumable,
                         tools=chat.tools, record=record, owner=owner)


def stream_generation(generation: Generation, position: int = 0):
    """SSE response reading a generation of this process, from event id `position` on."""
    generation.reader_joined()
    return sse_response(generation.log, heartbeat=relay().settings.SSE_HEARTBEAT_SECONDS,
                        position=position, on_close=generation.reader_left)


def last_event_id() -> int:
    """Where a reconnecting reader left off: `Last-Event-ID` (EventSource) or ?last_event_id=."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    if not raw.isdigit() or len(raw) > 12:
        raise ApiError(400, "invalid_request", "Last-Event-ID must be a whole number")
    return int(raw)


def stream_id_or_404(stream_id: str) -> str:
    if not ID_PATTERN.match(stream_id):
        raise ApiError(404, "not_found", "no such stream")
    return stream_id


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


def capabilities_of_this_server() -> dict[str, Any]:
    service = relay()
    transports = ["postsse", "fetch", "sse", "rest"]
    if websocket_offered(request.environ):
        transports.append("ws")
    providers = {name: {"models": list(p.models), "default_model": p.default_model}
                 for name, p in service.providers.items() if offered(p)}
    return {"transports": transports, "providers": providers, "default_provider": service.settings.LLM_PROVIDER,
            "auth": service.access.enabled}


@bp.get("/api/capabilities")
def capabilities():
    """What this server offers: transports (no WebSocket under mod_wsgi) and providers."""
    return jsonify(capabilities_of_this_server())


@bp.get("/")
def index():
    return render_template("index.html", capabilities=capabilities_of_this_server())


@bp.route("/api/chat/stream", methods=["GET", "POST"])
def chat_stream():
    chat = chat_request(from_query=request.method == "GET")
    return stream_generation(start_generation(chat))


@bp.post("/api/chat/streams")
def create_stream():
    """POST-SSE step 1: validate and store the payload; the stream starts when opened."""
    service = relay()
    service.access.count_request(g.caller)
    data = json_body()
    chat = parse_chat_request(data, service.settings, service.providers)  # refuse bad input now
    stream_id = new_id()
    # Accepted now: the user's message is stored now, and the ticket carries the history.
    conversation_id, task = conversations().begin(chat, stream_id)
    ticket = {"options": data, "conversation_id": conversation_id, "messages": task.messages, "owner": caller_id()}
    service.store.put_ticket(stream_id, ticket, service.settings.STREAM_TICKET_TTL)
    return jsonify(id=stream_id, stream_url=f"/api/chat/streams/{stream_id}", conversation_id=conversation_id), 201


@bp.get("/api/chat/streams/<stream_id>")
def open_stream(stream_id: str):
    """POST-SSE step 2: the stream, from any worker or host; resumes after Last-Event-ID."""
    service = relay()
    stream_id = stream_id_or_404(stream_id)
    position = last_event_id()
    generation = service.generations.get(stream_id)
    if generation is not None:  # produced in this process: read its log directly
        require_owner(generation.owner)
        if generation.log.closed and position >= len(generation.log.frames):
            return Response(status=204)  # finished and the reader has it all: EventSource stops here
        return stream_generation(generation, position)
    ticket = service.store.take_ticket(stream_id)
    if ticket is not None:  # first open: this process becomes the producer
        if g.get("caller") is not None and relay().access.enabled and g.caller.id != ticket["owner"]:
            service.store.put_ticket(stream_id, ticket, service.settings.STREAM_TICKET_TTL)
            require_owner(ticket["owner"])
        chat = parse_chat_request(ticket["options"], service.settings, service.providers)
        prepared = (ticket["conversation_id"], replace(chat.task, messages=ticket["messages"]))
        generation = start_generation(chat, stream_id, resumable=True, prepared=prepared, owner=ticket["owner"])
        return stream_generation(generation, position)
    state = service.store.log_state(stream_id)
    if state is None:
        raise ApiError(404, "not_found", "no such stream (unknown, or expired)")
    require_owner(service.store.log_owner(stream_id))
    view = StoreLogView(service.store, stream_id)
    if state == "closed" and not service.store.read_frames(stream_id, position, 0):
        return Response(status=204)  # finished and the reader has it all: EventSource stops here
    return sse_response(view, heartbeat=service.settings.SSE_HEARTBEAT_SECONDS, position=position)


@bp.delete("/api/chat/streams/<stream_id>")
def stop_stream(stream_id: str):
    """Stop a generation now, wherever it runs (its producer checks the store)."""
    service = relay()
    stream_id = stream_id_or_404(stream_id)
    generation = service.generations.get(stream_id)
    if generation is not None:
        require_owner(generation.owner)
        generation.stop("stopped")
        return jsonify(id=stream_id, status="stopped")
    ticket = service.store.take_ticket(stream_id)
    if ticket is not None:  # never opened: forgetting the payload is stopping it
        if service.access.enabled and g.caller.id != ticket["owner"]:
            service.store.put_ticket(stream_id, ticket, service.settings.STREAM_TICKET_TTL)
            require_owner(ticket["owner"])
        return jsonify(id=stream_id, status="stopped")
    state = service.store.log_state(stream_id)
    if state is None:
        raise ApiError(404, "not_found", "no such stream")
    require_owner(service.store.log_owner(stream_id))
    if state == "open":
        service.store.request_stop(stream_id)
    return jsonify(id=stream_id, status="stopped")


@bp.post("/api/chat")
def chat_rest():
    chat = chat_request(from_query=False)
    access, owner, request_id = relay().access, caller_id(), new_id()
    access.open_stream(owner, request_id)
    try:
        return rest_answer(chat, request_id)
    finally:
        access.close_stream(owner, request_id)


def rest_answer(chat: ChatRequest, request_id: str):
    memory = conversations()
    conversation_id, task = memory.begin(chat, request_id)
    answer = Answer()
    try:
        collect(chat.provider, task, tools=chat.tools, max_rounds=relay().settings.TOOL_MAX_ROUNDS, answer=answer)
    except ProviderError as err:
        answer.outcome, answer.error = "error", err.as_event()
        memory.finish(conversation_id, request_id, answer, answer.tool_records)
        status = err.status if err.status and 400 <= err.status < 600 else 502
        # A provider's 401 is the server's misconfiguration, not the caller's fault.
        status = 502 if status in (401, 403) else status
        return jsonify(error={"type": err.type, "message": err.message, "status": err.status}), status
    memory.finish(conversation_id, request_id, answer, answer.tool_records)
    return jsonify(
        id=request_id,
        conversation_id=conversation_id,
        provider=chat.provider.name,
        model=task.model,
        content=answer.text,
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        tools=answer.tool_records,
    )


@bp.get("/api/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    """The stored records of a conversation, in order (tool calls inside the answers)."""
    if not ID_PATTERN.match(conversation_id):
        raise ApiError(404, "not_found", "no such conversation")
    messages = relay().store.messages(conversation_id)
    if not messages:
        raise ApiError(404, "not_found", "no such conversation")
    return jsonify(id=conversation_id, messages=messages)


@bp.delete("/api/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    if not ID_PATTERN.match(conversation_id) or not relay().store.delete_conversation(conversation_id):
        raise ApiError(404, "not_found", "no such conversation")
    return jsonify(id=conversation_id, deleted=True)
