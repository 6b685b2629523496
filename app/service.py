"""The front door: the one service every way in goes through.

HTTP routes, the WebSocket, the Python API (and every transport added later) parse
their input, resolve the caller, and call `ChatService`. It owns what must hold
whichever way a request came: validation, rate limits, per-client caps (answers in
progress, unopened tickets), ownership of streams and conversations, and the records
of every answer. Transports only shape what it returns into their wire format.

Built whole by `ChatService.build` (in `create_app`); nothing is wired in afterwards.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

from flask import Response, has_request_context, request

from app.access import Access, Caller, MeteredStore
from app.allowed_models import AllowedModels
from app.budget import check_budget
from app.chat_request import ID_PATTERN, ChatRequest, parse_chat_request
from app.config import Settings
from app.conversations import Conversations
from app.errors import ApiError
from app.logs import REQUEST_ID
from app.metrics import Metrics
from app.protocols import RelayEvents
from app.providers import Provider, ProviderError
from app.providers.domain import Cancellation, Task, Text
from app.providers.failover import FailoverProvider, continuation, parse_fallbacks
from app.relay import (
    PRODUCER_ALIVE_SECONDS,
    SUPERSEDED,
    Adopted,
    Answer,
    DrivenLog,
    Generation,
    Relay,
    StoreLogView,
    collect,
    new_id,
)
from app.sse import HEARTBEAT, FrameLog, StreamLog, client_socket, peer_closed, sse_response
from app.store import Store
from app.tools import Toolbox, toolbox

# Last-Event-ID as the protocol writes it: ASCII digits only ("²".isdigit() is true).
EVENT_ID = re.compile(r"[0-9]{1,12}")
# The store key of a running resumable answer's request, for adoption (never a valid stream id).
ADOPT = "adopt:"
logger = logging.getLogger("llm_sse_relay.stream")


@dataclass
class Reading:
    """What a transport serves: a log to read from `position` on, and what to call when the
    reader leaves (`on_close(completed)`) or asks to stop (`stop()`)."""

    log: FrameLog
    position: int = 0
    on_close: Callable[[bool], None] | None = None
    stop: Callable[[], None] | None = None

    def releasing(self, slot: ExitStack) -> Reading:
        """This reading, with `slot` given back when its reader leaves (after its own `on_close`)."""
        left = self.on_close

        def on_close(completed: bool) -> None:
            with slot:
                if left is not None:
                    left(completed)

        return replace(self, on_close=on_close)


@dataclass(frozen=True)
class Ticket:
    """A POST-SSE request accepted at step 1. The prompt is not in it: it is stored once, in
    the conversation, and the history is read from there when the stream opens."""

    owner: str
    provider: str
    model: str
    conversation_id: str
    position: int
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: tuple[str, ...] = ()
    reasoning: str | None = None

    def task(self, messages: list[dict[str, Any]]) -> Task:
        """The request to send, with the history read from its conversation."""
        return Task(messages=messages, model=self.model, system=self.system, temperature=self.temperature,
                    max_tokens=self.max_tokens, reasoning=self.reasoning)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tools": list(self.tools)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ticket:
        return cls(**{**data, "tools": tuple(data.get("tools") or ())})


class ChatService:
    def __init__(self, settings: Settings, providers: dict[str, Provider], store: Store, access: Access,
                 relay: Relay, conversations: Conversations, metrics: Metrics,
                 fallbacks: list[tuple[Provider, str]] | None = None, allowed: AllowedModels | None = None,
                 *, tools: Toolbox) -> None:
        self.settings = settings
        self.tools = tools  # this app's tools (app.tools)
        self.providers = providers
        self.metrics = metrics
        self.fallbacks = fallbacks or []
        self.allowed = allowed or AllowedModels({})
        self.store = store
        self.access = access
        self.relay = relay
        self.conversations = conversations

    @classmethod
    def build(cls, settings: Settings, providers: dict[str, Provider], store: Store, metrics_dir: str) -> ChatService:
        """The service and everything it owns, built whole; its metrics (in `metrics_dir`) label
        only the models and tools this server has."""
        allowed = AllowedModels.from_settings(settings, providers)
        fallbacks = parse_fallbacks(settings.LLM_FALLBACKS, providers)
        tools = toolbox.copy()  # the tools declared with @tool so far: this app's from now on
        # Label values metrics may use: the models each provider may answer with, the app's tools.
        known_models = {name: {*p.models, p.default_model, *allowed.named(name),
                               *(m for f, m in fallbacks if f.name == name)} for name, p in providers.items()}
        metrics = Metrics(metrics_dir, known_models, tools.tools)
        access = Access(settings, store, on_refusal=metrics.refused)
        # Conversations store through the quota: every record counts against its owner.
        conversations = Conversations(MeteredStore(store, settings.STORAGE_QUOTA_BYTES), settings, access)
        return cls(settings, providers, store, access, Relay(settings, store, on_store_error=metrics.store_failed),
                   conversations, metrics, fallbacks, allowed, tools=tools)

    def _serving(self, provider: Provider) -> Provider:
        """The provider that answers one request: the request's, with the LLM_FALLBACKS chain
        behind it and the request's retry budget (one for all its tool rounds)."""
        return FailoverProvider(provider, self.fallbacks, self.settings.UPSTREAM_MAX_RETRIES)

    def _check_model(self, chat: ChatRequest) -> None:
        """A request may name only the models this server offers for its provider (ALLOWED_MODELS)."""
        self.allowed.check(chat.provider.name, chat.task.model)

    # -- accepting a request
    def admit(self, caller: Caller) -> None:
        """A request that starts an answer counts against the caller's rate limit (429 beyond it)."""
        self.access.count_request(caller)

    def accept(self, caller: Caller, data: dict[str, Any], from_query: bool = False) -> ChatRequest:
        """Admit and validate a request in the relay's own options (docs/http-api.md)."""
        self.admit(caller)
        return parse_chat_request(data, self.settings, self.providers, self.tools, from_query=from_query)

    # -- direct streams (SSE GET/POST, WebSocket, the Python API's task().stream())
    def stream(self, caller: Caller, chat: ChatRequest, wire: Any = None, transport: str = "sse") -> Reading:
        """Start an answer now; it stops as soon as its one reader leaves. `wire` is what the
        client reads (app/protocols.py; default the relay's event protocol); `transport` names
        the way in for metrics."""
        check_budget(chat.task, self.settings)
        self._check_model(chat)
        stream_id = new_id()
        with ExitStack() as slot:
            slot.enter_context(self.access.stream_slot(caller.id, stream_id))
            conversation_id, task = self._begin(caller, chat, stream_id)
            generation = self._start(chat, task, conversation_id, stream_id, caller.id, slot.pop_all(),
                                     resumable=False, wire=wire, transport=transport)
        return self._reading(generation, 0)

    def sse(self, reading: Reading, retry: bool = True, headers: dict[str, str] | None = None,
            keepalive: bytes = HEARTBEAT) -> Response:
        """A reading as the SSE response every transport sends: this app's heartbeat and
        client write timeout; `retry=False` for clients of other SSE formats than EventSource,
        `keepalive` the frame a heartbeat writes (app/sse.py)."""
        return sse_response(reading.log, heartbeat=self.settings.SSE_HEARTBEAT_SECONDS, position=reading.position,
                            on_close=reading.on_close, retry=retry, headers=headers,
                            write_timeout=self.settings.CLIENT_WRITE_TIMEOUT, keepalive=keepalive)

    # -- POST-SSE
    def create_ticket(self, caller: Caller, chat: ChatRequest) -> dict[str, str]:
        """Step 1: accept the request and keep it until its stream is opened (the user's message
        is stored now). Unopened tickets count against the caller."""
        check_budget(chat.task, self.settings)
        self._check_model(chat)
        ticket_id = new_id()
        ttl = self.settings.STREAM_TICKET_TTL
        task = chat.task  # its messages are read from the conversation when the stream opens

        def ticket(conversation_id: str, position: int) -> tuple[str, dict[str, Any], float]:
            kept = Ticket(caller.id, chat.provider.name, task.model, conversation_id, position, task.system,
                          task.temperature, task.max_tokens, tuple(t.name for t in chat.tools),
                          reasoning=task.reasoning)
            return ticket_id, kept.to_dict(), ttl

        with self.access.held_ticket(caller.id, ticket_id, ttl):
            if chat.conversation_id is None:  # its first messages and the ticket in one store write
                conversation_id, _, _ = self.conversations.begin(caller, chat, ticket_id, ticket=ticket)
            else:
                conversation_id, _, position = self.conversations.begin(caller, chat, ticket_id)
                self.store.put_ticket(*ticket(conversation_id, position))
        return {"id": ticket_id, "stream_url": f"/api/chat/streams/{ticket_id}", "conversation_id": conversation_id}

    def open_stream(self, caller: Caller | None, stream_id: str, last_event_id: str | None,
                    reader: str | None = None) -> Reading | None:
        """Step 2, from any worker or host: the stream after `last_event_id`, or None when the
        reader already has all of a finished stream (then EventSource must stop: 204).

        The id is the credential (EventSource sends no headers); a caller who does present
        credentials must be the creator. `reader` (the client's identity) holds one of its
        MAX_READERS_PER_CLIENT slots while the reading is open. An id nobody issued is
        answered from reads alone (a slot costs store writes), and each one counts against
        the reader's STREAM_LOOKUP_LIMIT.
        """
        self._valid_id(stream_id, "stream")
        if reader is not None:
            self.access.lookups.check(reader)
        if not self._stream_exists(stream_id):
            if reader is not None:
                self.access.lookups.missed(reader)
            raise ApiError(404, "not_found", "no such stream (unknown, or expired)")
        if reader is None:
            return self._open_stream(caller, stream_id, last_event_id)
        with ExitStack() as slot:
            slot.enter_context(self.access.reader_slot(reader, new_id()))
            reading = self._open_stream(caller, stream_id, last_event_id)
            # Nothing to read (None): the slot is given back now; else when the reader leaves.
            return None if reading is None else reading.releasing(slot.pop_all())

    def _stream_exists(self, stream_id: str) -> bool:
        """Whether the id is a stream here, a ticket, or a log in the store (reads only)."""
        return (stream_id in self.relay.generations or self.store.ticket_exists(stream_id)
                or self.store.log_state(stream_id) is not None)

    def _open_stream(self, caller: Caller | None, stream_id: str, last_event_id: str | None) -> Reading | None:
        position = self.event_position(last_event_id)
        generation = self.relay.resumable(stream_id)
        if generation is not None:  # produced in this process: read its log directly
            self._owner_check(caller, generation.owner)
            if generation.log.closed and position >= len(generation.log.frames):
                return None
            return self._reading(generation, position)
        # Taken, and kept as the adoption record while the answer runs (if this process dies, a
        # restart, another one adopts it), in one store write.
        ticket = self.store.move_ticket(stream_id, ADOPT + stream_id, self.settings.STREAM_LOG_TTL)
        if ticket is not None:  # first open: this process becomes the producer
            return self._produce(caller, stream_id, ticket, position)
        state = self.store.log_state(stream_id)
        if state is None:
            raise ApiError(404, "not_found", "no such stream (unknown, or expired)")
        self._owner_check(caller, self.store.log_owner(stream_id))
        # A reader that got the last event from the producer's process may be here before that
        # process has written it (and "closed") to the store: wait up to a heartbeat for a frame
        # after its position or the end, so that a finished stream answers 204 however soon.
        read = self.store.read_log(stream_id, position, self.settings.SSE_HEARTBEAT_SECONDS)
        if read.state is None:
            raise ApiError(404, "not_found", "no such stream (unknown, or expired)")
        if read.state == "closed" and not read.frames:
            return None
        return Reading(StoreLogView(self.store, stream_id, adopt=lambda: self._adopt(stream_id)), position)

    def _produce(self, caller: Caller | None, stream_id: str, data: dict[str, Any], position: int) -> Reading:
        """Start the generation of a ticket just taken (moved to its adoption record). A ticket
        whose opening is refused (not the creator, a cap, a store error) is put back, so the
        creator can still open it."""
        try:
            ticket = Ticket.from_dict(data)
        except (TypeError, KeyError):  # kept by an older version of the app: it cannot be opened
            self.store.take_ticket(ADOPT + stream_id)
            raise ApiError(404, "not_found", "no such stream (unknown, or expired)") from None
        with ExitStack() as refused:
            refused.callback(self.store.move_ticket, ADOPT + stream_id, stream_id, self.settings.STREAM_TICKET_TTL)
            self._owner_check(caller, ticket.owner)
            provider = self.providers.get(ticket.provider)
            if provider is None or not provider.configured:
                raise ApiError(400, "provider_not_configured", f"provider '{ticket.provider}' is not available")
            messages = self.conversations.history_at(ticket.conversation_id, ticket.position, stream_id)
            self.access.open_stream(ticket.owner, stream_id)
            slot = ExitStack()  # held until the generation ends
            slot.callback(self.access.close_stream, ticket.owner, stream_id)
            refused.pop_all()  # opened: the ticket is not put back
        self.access.release_ticket(ticket.owner, stream_id)
        task = ticket.task(messages)
        chat = ChatRequest(provider, task, ticket.conversation_id, self.tools.select(list(ticket.tools)))
        return self._reading(self._start(chat, task, ticket.conversation_id, stream_id, ticket.owner, slot,
                                         resumable=True, transport="postsse", adoptable=True), position)

    def _adopt(self, stream_id: str) -> StreamLog | None:
        """Continue an answer whose producer died (its process was restarted or killed), here.

        Exactly one process adopts it (the record is taken once), and takes the log over: a
        producer that was only stalled, not dead, is refused from then on and stops (see
        LogFlusher). The new producer gets the text of the stored frames as the beginning of
        the answer and continues it as failover does, with event ids following on; readers
        see `meta {"resumed"}` and more tokens. Returns the new generation's log, or None
        when there is nothing to adopt.
        """
        data = self.store.take_ticket(ADOPT + stream_id)
        if data is None:
            return None
        lease = new_id()
        try:
            ticket = Ticket.from_dict(data)
            provider = self.providers[ticket.provider]
            messages = self.conversations.history_at(ticket.conversation_id, ticket.position, stream_id)
            if not self.store.take_over(stream_id, lease):
                return None  # the log expired meanwhile
            # Read only now that the old producer can add nothing: these are all its frames.
            frames = [frame for _, frame in self.store.read_frames(stream_id, 0, 0)]
            written = RelayEvents.text_of(frames)
        except Exception as exc:  # unreadable record, provider gone, conversation deleted: the stream is lost
            logger.warning("stream %s: cannot adopt it: %s", stream_id, exc)
            return None
        self.store.put_ticket(ADOPT + stream_id, data, self.settings.STREAM_LOG_TTL)  # if this process dies too
        task = continuation(ticket.task(messages), ticket.model, written, provider)
        chat = ChatRequest(provider, task, ticket.conversation_id, self.tools.select(list(ticket.tools)))
        logger.info("stream %s: adopted after %d characters (its producer stopped)", stream_id, len(written))
        # The dead producer's stream slot (it expires by itself within SLOT_TTL) is given back
        # when this answer ends.
        slot = ExitStack()
        slot.callback(self.access.close_stream, ticket.owner, stream_id)
        generation = self._start(chat, task, ticket.conversation_id, stream_id, ticket.owner, slot, resumable=True,
                                 transport="postsse", resumed=Adopted(frames, written, lease), adoptable=True)
        return generation.log

    def stop_stream(self, caller: Caller, stream_id: str) -> None:
        """Stop a generation now, wherever it runs (its producer checks the store)."""
        self._valid_id(stream_id, "stream")
        generation = self.relay.resumable(stream_id)
        if generation is not None:
            self._owner_check(caller, generation.owner)
            generation.stop("stopped")
            return
        data = self.store.take_ticket(stream_id)
        if data is not None:  # never opened: forgetting the payload is stopping it
            owner = data.get("owner") or ""
            if not self.access.owns(caller, owner):
                self.store.put_ticket(stream_id, data, self.settings.STREAM_TICKET_TTL)
                self._owner_check(caller, owner)
            self.access.release_ticket(owner, stream_id)
            return
        state = self.store.log_state(stream_id)
        if state is None:
            raise ApiError(404, "not_found", "no such stream")
        self._owner_check(caller, self.store.log_owner(stream_id))
        if state == "open":
            self.store.request_stop(stream_id)

    # -- REST and the Python API's ask()
    def answer(self, caller: Caller, chat: ChatRequest, transport: str = "rest") -> tuple[str, str, Answer]:
        """The whole answer at once: (request id, conversation id, answer), recorded like a stream.
        Raises ProviderError (after recording it) when the provider failed.

        Inside a request, its client's socket (where the server exposes it) is watched every
        heartbeat while the answer is produced: a client that left stops it, as a stream's
        reader does.
        """
        self._check_model(chat)
        check_budget(chat.task, self.settings)
        request_id = new_id()
        with self.access.stream_slot(caller.id, request_id):
            return self._answer(caller, chat, request_id, transport)

    def _answer(self, caller: Caller, chat: ChatRequest, request_id: str, transport: str) -> tuple[str, str, Answer]:
        started, answer = time.monotonic(), Answer()
        self.metrics.stream_opened(transport)
        cancel = Cancellation()
        try:
            conversation_id, task = self._begin(caller, chat, request_id)
            watching = self._watch_client(client_socket(request.environ) if has_request_context() else None, cancel)
            try:
                collect(self._serving(chat.provider), task, cancel, tools=chat.tools,
                        max_rounds=self.settings.TOOL_MAX_ROUNDS, answer=answer)
            except ProviderError as err:
                answer.outcome, answer.error = "error", err.as_event()
                self._finish(conversation_id, request_id, answer, caller.id)
                raise
            finally:
                watching.set()
            self._finish(conversation_id, request_id, answer, caller.id)
            return request_id, conversation_id, answer
        finally:
            self.metrics.stream_closed(transport)
            if answer.outcome != "running":
                self.metrics.answer_ended(transport, chat.provider.name, chat.task.model, answer, started, None,
                                          len(answer.parts))

    def _watch_client(self, sock: socket.socket | None, cancel: Cancellation) -> threading.Event:
        """Cancel `cancel` once the client on `sock` has gone (checked every heartbeat, as an
        SSE response does between frames: a WSGI app sees a departure only on its socket).
        Returns the event that ends the watch."""
        over = threading.Event()
        if sock is None:  # mod_wsgi exposes no socket: Apache's own timeouts are the bound there
            return over
        interval = self.settings.SSE_HEARTBEAT_SECONDS

        def watch() -> None:
            while not over.wait(interval):
                if peer_closed(sock):
                    cancel.cancel("abandoned")
                    return

        threading.Thread(target=watch, name="relay-client-watch", daemon=True).start()
        return over

    def text_stream(self, caller: Caller, chat: ChatRequest) -> Iterator[str]:
        """The answer's text pieces (the Python API's ask_stream); holds a stream slot while open."""
        self._check_model(chat)
        check_budget(chat.task, self.settings)
        cancel = Cancellation()
        with self.access.stream_slot(caller.id, new_id()):
            try:
                for delta in self._serving(chat.provider).stream(chat.task, cancel):
                    if delta.__class__ is Text:
                        yield delta.text
            finally:
                cancel.cancel("closed")

    # -- conversations
    def conversation(self, caller: Caller, conversation_id: str) -> list[dict[str, Any]]:
        self._valid_id(conversation_id, "conversation")
        return self.conversations.read(caller, conversation_id)

    def forget_conversation(self, caller: Caller, conversation_id: str) -> None:
        self._valid_id(conversation_id, "conversation")
        self.conversations.forget(caller, conversation_id)

    # -- background answers (OpenAI's Responses API, app/responses_api.py)
    def start_background(self, caller: Caller, chat: ChatRequest, wire: Any,
                         transport: str = "responses", log_bytes: int = 0) -> tuple[str, Reading]:
        """Start an answer that runs to its end whether or not anyone reads it; only
        `stop_stream` stops it. Its log goes to the store, so it can be read from the start
        on any worker or host. Returns its conversation id and a reading of it here (whose
        reader leaving changes nothing).

        `log_bytes`, what the log repeats of the request (the wire's echo of it), counts
        against the caller's storage quota for as long as such a log may be kept (its answer,
        then STREAM_LOG_TTL): deleting the conversation leaves the log, so without this a
        create-and-delete loop would fill the store."""
        check_budget(chat.task, self.settings)
        self._check_model(chat)
        stream_id = new_id()
        metered = self.conversations.store if isinstance(self.conversations.store, MeteredStore) else None
        with ExitStack() as slot, ExitStack() as undo:
            slot.enter_context(self.access.stream_slot(caller.id, stream_id))
            if metered is not None:
                metered.hold(caller.id, f"log:{stream_id}", log_bytes, 2 * self.settings.STREAM_LOG_TTL)
                undo.callback(metered.unhold, caller.id, f"log:{stream_id}", log_bytes)
            conversation_id, task, _ = self.conversations.begin(caller, chat, stream_id)
            generation = self._start(chat, task, conversation_id, stream_id, caller.id, slot.pop_all(),
                                     resumable=True, wire=wire, transport=transport)
            undo.pop_all()  # kept once started: the log outlives the answer and a deleted response
        # No reader drives it (there may be none) and none joins it: no reader's leaving,
        # and no grace period, ends it.
        if generation.claim_driver():
            threading.Thread(target=generation.run, name=f"relay-{stream_id[:8]}", daemon=True).start()
        return conversation_id, Reading(generation.log)

    def background_reading(self, reader: str, stream_id: str) -> Reading:
        """A background answer's log from its start, wherever it is produced (the route has
        checked that the caller owns it). Holds one of the reader's MAX_READERS_PER_CLIENT
        slots while open."""
        with ExitStack() as slot:
            slot.enter_context(self.access.reader_slot(reader, new_id()))
            generation = self.relay.resumable(stream_id)
            if generation is not None:
                log: StreamLog | StoreLogView = generation.log
            elif self.store.log_state(stream_id) is not None:
                log = StoreLogView(self.store, stream_id)
            else:
                raise ApiError(404, "not_found", "the events of this response are no longer kept")
            return Reading(log).releasing(slot.pop_all())

    def background_running(self, stream_id: str) -> bool:
        """Whether a background answer is still being produced, here or in another process that
        is alive (its producer says so every PRODUCER_ALIVE_SECONDS)."""
        generation = self.relay.resumable(stream_id)
        if generation is not None:
            return not generation.log.closed
        if self.store.log_state(stream_id) != "open":
            return False
        seen = self.store.seen_at(stream_id, "producer")
        return seen is None or time.time() - seen < 5 * PRODUCER_ALIVE_SECONDS

    # -- shared steps
    def _start(self, chat: ChatRequest, task: Task, conversation_id: str, stream_id: str, owner: str,
               slot: ExitStack, resumable: bool, wire: Any = None, transport: str = "sse",
               resumed: Adopted | None = None, adoptable: bool = False) -> Generation:
        """Produce `task` (the request with its history) as a generation bound to `owner`; `slot`
        (the owner's stream slot) is given back when the generation ends. An `adoptable` answer
        (POST-SSE: its adoption record is kept under ADOPT + `stream_id`) has as `slot` only the
        `close_stream` of `owner`'s slot for `stream_id`, so that its end gives the slot back and
        removes the record in the store write that keeps its answer (or, if that write failed, in
        one of their own)."""
        metrics = self.metrics
        released = False

        def record(generation: Generation) -> None:
            nonlocal released
            if generation.cancel.reason == SUPERSEDED:  # the adopter records the answer
                return
            if adoptable and generation.conversation_id:  # ended here: nothing left to adopt
                slot.pop_all()
                ending = (self.access.closing_stream(owner, generation.id), ADOPT + generation.id)
                self.conversations.finish(generation.conversation_id, generation.id, generation.answer, owner,
                                          releasing=ending)
                released = True
            else:
                self._finish(generation.conversation_id, generation.id, generation.answer, owner)

        def release(generation: Generation) -> None:
            if released:  # with the answer
                pass
            elif adoptable and generation.cancel.reason != SUPERSEDED:
                slot.pop_all()
                try:
                    self.access.close_stream_dropping(owner, generation.id, ADOPT + generation.id)
                except Exception as exc:
                    logger.warning("stream %s: giving back its slot and adoption record failed: %s", generation.id, exc)
            else:
                slot.close()
            metrics.stream_closed(transport)
            metrics.answer_ended(transport, generation.provider.name, generation.task.model, generation.answer,
                                 generation.started, generation.first_token_at, generation.token_events)

        metrics.stream_opened(transport)

        provider = self._serving(chat.provider)
        # Produced on its first reader's thread when nothing it waits for can hold that thread
        # past a heartbeat: the provider yields while idle, and no tool (which may take any
        # time) runs. An adopted answer is read through the store: it gets a thread of its own.
        return self.relay.start(provider, task, conversation_id, stream_id=stream_id, owner=owner,
                                resumable=resumable, tools=chat.tools, record=record, release=release, wire=wire,
                                request_id=REQUEST_ID.get(), resumed=resumed,
                                driven=resumed is None and provider.idles and not chat.tools)

    def _begin(self, caller: Caller, chat: ChatRequest, request_id: str) -> tuple[str, Task]:
        """The conversation id and the task to send: the request's messages stored (and its
        history loaded), or, for a request that keeps no record, the task as it came and no id."""
        if not chat.keep_record:
            return "", chat.task
        conversation_id, task, _ = self.conversations.begin(caller, chat, request_id)
        return conversation_id, task

    def _finish(self, conversation_id: str, request_id: str, answer: Answer, owner: str) -> None:
        if conversation_id:  # "": a request that keeps no record
            self.conversations.finish(conversation_id, request_id, answer, owner)

    @staticmethod
    def _reading(generation: Generation, position: int) -> Reading:
        """A reader of `generation`; the first reader of a driven one produces it as it reads."""
        generation.reader_joined()
        stop = lambda: generation.stop("stopped")  # noqa: E731
        if generation.claim_driver():
            return Reading(DrivenLog(generation), position, generation.driver_left, stop)
        return Reading(generation.log, position, generation.reader_left, stop)

    def _owner_check(self, caller: Caller | None, owner: str | None) -> None:
        """A stream is bound to its creator: with auth on, a caller with credentials must be them."""
        if caller is not None and not self.access.owns(caller, owner):
            raise ApiError(403, "forbidden", "this stream belongs to another client")

    @staticmethod
    def event_position(raw: str | None) -> int:
        """Where a reconnecting reader left off: `Last-Event-ID`, plain ASCII digits."""
        if raw is None or raw == "":
            return 0
        if not EVENT_ID.fullmatch(raw):
            raise ApiError(400, "invalid_request", "Last-Event-ID must be a whole number of at most 12 digits")
        return int(raw)

    @staticmethod
    def _valid_id(value: str, what: str) -> None:
        if not ID_PATTERN.fullmatch(value):
            raise ApiError(404, "not_found", f"no such {what}")

