"""The store's narrow interface: what the relay needs to share between processes and hosts.

- tickets: a POST-SSE payload, kept until its stream is opened (taken once);
- stream logs: the encoded events of a resumable stream, readable from any process, written
  by one producer at a time (its lease: a producer whose stream was adopted elsewhere is
  refused, so two never interleave frames);
- stream control: "stop" requests and when a reader was last seen;
- conversations: the messages of a chat, in order, with the caller that owns it and its size;
  a deleted one leaves a tombstone that refuses records until it would have expired.

Everything a store keeps expires by itself (tickets, logs, conversations, counters,
slots), whichever routes a deployment uses: SQLite and memory sweep on their writes,
Redis has key expiry.

`MemoryStore` is the single-process version (tests, `STORE_URL=memory://`); SQLite is
the default for one host, Redis for several.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("llm_sse_relay.store")

Frame = tuple[int, bytes]
# A POST-SSE ticket to keep: (id, payload, ttl), as `put_ticket` takes them.
Ticket = tuple[str, dict[str, Any], float]
# How often a store without key expiry drops what expired (on its next write).
SWEEP_SECONDS = 60.0

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def to_json(data: Any) -> str:
    """Compact JSON for storage: UTF-8 text as is (CJK stays 3 bytes a character, not a
    6-byte escape); only a lone surrogate, which UTF-8 cannot carry, forces escapes."""
    text = _dumps(data)
    try:
        text.encode()
    except UnicodeEncodeError:
        return _dumps_ascii(data)
    return text


@dataclass(frozen=True)
class LogRead:
    """A stream log's frames and its state seen at one instant. When `state` is not "open",
    `frames` are all the log holds after the position read from: the producer writes its
    last frames with (or before) "closed", and a reader that asked twice could see the
    state after that write and the frames before it, and lose the end of the answer."""

    frames: list[Frame]
    state: str | None  # "open", "closed", or None for an unknown or expired stream


class StoreError(RuntimeError):
    """The store cannot answer now (locked too long, unreachable, full): a 503, not a 500."""


@dataclass(frozen=True)
class ConversationInfo:
    """Who a conversation belongs to and how big it is (for ownership and the size caps)."""

    owner: str
    messages: int
    bytes: int


class ConversationStore(Protocol):
    """What conversations need of a store (app.conversations, through app.access.MeteredStore)."""

    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                        owner: str = "") -> ConversationInfo | None:
        """Append records in one step; a new conversation is bound to `owner`. Returns its
        size after, or None (nothing stored) when the conversation was deleted: its
        tombstone refuses the record of an answer that was still running. The
        conversation expires `ttl` seconds after its last append."""
        ...

    def append_message(self, conversation_id: str, message: dict[str, Any], ttl: float,
                       owner: str = "") -> ConversationInfo | None:
        return self.append_messages(conversation_id, [message], ttl, owner)

    def start_conversation(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float, owner: str,
                           ticket: Ticket | None = None) -> ConversationInfo:
        """`append_messages` for a conversation whose id was just issued (so no tombstone or
        expired records of it can exist), and with its records the POST-SSE `ticket` that
        will answer them (`put_ticket`'s arguments), in one write."""
        ...

    def append_message_releasing(self, conversation_id: str, message: dict[str, Any], ttl: float, owner: str,
                                 slot: tuple[str, str] | None, ticket_id: str) -> ConversationInfo | None:
        """`append_message` of a POST-SSE stream's answer, and the stream's end in the same write:
        its `slot` (key, member) given back (None: it held none) and the ticket `ticket_id` (its
        adoption record) deleted, whether or not a tombstone refuses the record."""
        ...

    def conversation(self, conversation_id: str) -> ConversationInfo | None:
        """Owner and size of a conversation; None when unknown or expired."""
        ...

    def messages(self, conversation_id: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Records `start` to `stop` (not included; None: to the end), oldest first."""
        ...

    def delete_conversation(self, conversation_id: str) -> bool:
        """Forget a conversation, leaving a tombstone until it would have expired; False when
        there was none."""
        ...


class Store(ConversationStore, Protocol):
    """What the app needs of a store; every method is safe to call from any thread, and a
    store that cannot answer raises `StoreError` (its backend's own errors stay inside it).
    The stores subclass it and take its few derived methods."""

    # -- tickets
    def put_ticket(self, ticket_id: str, payload: dict[str, Any], ttl: float) -> None:
        ...

    def start_conversation(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float, owner: str,
                           ticket: Ticket | None = None) -> ConversationInfo:
        info = self.append_messages(conversation_id, messages, ttl, owner)
        if info is None:  # a tombstone under an id issued just now: the id was not new
            raise StoreError(f"conversation {conversation_id} was not new")
        if ticket is not None:
            self.put_ticket(*ticket)
        return info

    def append_message_releasing(self, conversation_id: str, message: dict[str, Any], ttl: float, owner: str,
                                 slot: tuple[str, str] | None, ticket_id: str) -> ConversationInfo | None:
        info = self.append_message(conversation_id, message, ttl, owner)
        try:
            if slot is None:
                self.take_ticket(ticket_id)
            else:
                self.release_dropping(*slot, ticket_id)
        except StoreError as exc:
            # The answer is kept: told it was not, its reader would ask for it again. What
            # was not given back expires with its TTL.
            log.warning("the end of stream record %s was not written (%s); its slot and record expire", ticket_id,
                        exc)
        return info

    def take_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        """The payload to the first caller only (it becomes the producer); None after."""
        ...

    def ticket_exists(self, ticket_id: str) -> bool:
        """Whether a ticket waits under this id (a read: looking costs no write)."""
        ...

    def move_ticket(self, ticket_id: str, to_id: str, ttl: float) -> dict[str, Any] | None:
        """`take_ticket`, and its payload kept under `to_id` for `ttl`, in one write (a stream
        opened, its adoption record kept: one store transaction, not two). None, and nothing
        kept, when there was no ticket."""
        ...

    # -- stream logs
    def open_log(self, stream_id: str, ttl: float, owner: str = "", lease: str = "") -> None:
        """Start a log; its appends are taken from the producer holding `lease` only."""
        ...

    def take_over(self, stream_id: str, lease: str) -> bool:
        """Make `lease` the log's producer (adoption) and count it alive now; the previous
        producer's appends are refused from here on. False when the log is gone."""
        ...

    def log_owner(self, stream_id: str) -> str | None:
        """Who created the stream (the caller id bound to it at POST-SSE step 1)."""
        ...

    def append_frames(self, stream_id: str, frames: list[Frame]) -> None:
        """`append_many` for one stream."""
        self.append_many({stream_id: frames})

    def read_log(self, stream_id: str, after: int, timeout: float) -> LogRead:
        """Frames with id > `after` and the log's state, in one snapshot; waits up to
        `timeout` while there are none and the log is open."""
        ...

    def read_frames(self, stream_id: str, after: int, timeout: float) -> list[Frame]:
        """Frames with id > `after`; waits up to `timeout` when there are none yet."""
        return self.read_log(stream_id, after, timeout).frames

    def close_log(self, stream_id: str, ttl: float) -> None:
        """`append_many` closing one stream."""
        self.append_many({}, closing=(stream_id,), ttl=ttl)

    def log_state(self, stream_id: str) -> str | None:
        """"open", "closed", or None for an unknown or expired stream."""
        ...

    # -- batches: one round trip for every stream a process produces (see relay.LogFlusher)
    def append_many(self, batch: dict[str, list[Frame]], closing: tuple[str, ...] = (), ttl: float = 0,
                    leases: dict[str, str] | None = None) -> set[str]:
        """Append frames of many streams; then mark `closing` streams closed (kept `ttl` s).

        A stream named in `leases` is written only while that lease is its producer's: the
        streams another producer took over are returned, and nothing of theirs is written.
        Frames already in a log (a batch written again after a failure) are skipped."""
        ...

    def stopped_among(self, stream_ids: list[str]) -> set[str]:
        """Which of the streams were asked to stop (`request_stop`)."""
        ...

    def touch_many(self, stream_ids: list[str], who: str) -> None:
        """`touch` for many streams, in one round trip."""
        ...

    # -- stream control
    def request_stop(self, stream_id: str) -> None:
        ...

    def touch(self, stream_id: str, who: str) -> None:
        """Record that a `reader` or the `producer` of a stream is alive, now."""
        ...

    def seen_at(self, stream_id: str, who: str) -> float | None:
        ...

    # -- limits shared by every process
    def hit(self, key: str, window: float) -> tuple[int, float]:
        """Count one hit in the current fixed window; (hits so far, seconds until it resets)."""
        ...

    def acquire(self, key: str, member: str, limit: int, ttl: float) -> bool:
        """Take one of `limit` slots for `member` (a stream); False when all are taken.

        A slot lives `ttl` seconds unless refreshed, so a process that dies holding
        slots frees them by itself.
        """
        ...

    def refresh(self, slots: list[tuple[str, str]], ttl: float) -> None:
        """Keep the (key, member) slots of live streams for another `ttl` seconds."""
        ...

    def release(self, key: str, member: str) -> None:
        ...

    def release_dropping(self, key: str, member: str, ticket_id: str) -> None:
        """`release` and the ticket `ticket_id` deleted, in one write (a stream's end: its slot
        given back, its adoption record gone)."""
        ...

    def close(self) -> None:
        """Close its connections (the end of a process, or of a test)."""


class MemoryStore(Store):
    """Everything in this process's memory: one worker only."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._tickets: dict[str, tuple[float, str]] = {}
        self._logs: dict[str, list[Frame]] = defaultdict(list)
        self._state: dict[str, dict[str, Any]] = {}
        self._conversations: dict[str, dict[str, Any]] = {}
        self._tombstones: dict[str, float] = {}  # deleted conversation -> when it would have expired
        self._windows: dict[str, tuple[float, int]] = {}
        self._slots: dict[str, dict[str, float]] = defaultdict(dict)
        self._last_sweep = time.time()

    def _sweep(self) -> None:
        """Drop what expired (called with the lock held, at most every SWEEP_SECONDS)."""
        now = time.time()
        if now - self._last_sweep < SWEEP_SECONDS:
            return
        self._last_sweep = now
        for ticket_id in [t for t, (expires, _) in self._tickets.items() if expires < now]:
            del self._tickets[ticket_id]
        for stream_id in [s for s, state in self._state.items() if state["expires"] < now]:
            del self._state[stream_id]
            self._logs.pop(stream_id, None)
        for cid in [c for c, conv in self._conversations.items() if conv["expires"] < now]:
            del self._conversations[cid]
        for cid in [c for c, expires in self._tombstones.items() if expires < now]:
            del self._tombstones[cid]
        for key in [k for k, (start, _) in self._windows.items() if start < now - 86_400]:
            del self._windows[key]
        for key in list(self._slots):
            live = {m: e for m, e in self._slots[key].items() if e > now}
            if live:
                self._slots[key] = live
            else:
                del self._slots[key]

    def put_ticket(self, ticket_id: str, payload: dict[str, Any], ttl: float) -> None:
        with self._lock:
            self._sweep()
            self._tickets[ticket_id] = (time.time() + ttl, to_json(payload))

    def take_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        with self._lock:
            expires, payload = self._tickets.pop(ticket_id, (0, None))
        return json.loads(payload) if payload and expires > time.time() else None

    def ticket_exists(self, ticket_id: str) -> bool:
        expires, _ = self._tickets.get(ticket_id, (0, None))
        return expires > time.time()

    def move_ticket(self, ticket_id: str, to_id: str, ttl: float) -> dict[str, Any] | None:
        with self._lock:
            expires, payload = self._tickets.pop(ticket_id, (0, None))
            if not payload or expires <= time.time():
                return None
            self._tickets[to_id] = (time.time() + ttl, payload)
        moved: dict[str, Any] = json.loads(payload)
        return moved

    def open_log(self, stream_id: str, ttl: float, owner: str = "", lease: str = "") -> None:
        with self._lock:
            self._sweep()
            self._state[stream_id] = {"state": "open", "stop": False, "expires": time.time() + ttl, "owner": owner,
                                      "lease": lease}

    def take_over(self, stream_id: str, lease: str) -> bool:
        with self._lock:
            if self.log_state(stream_id) is None:
                return False
            self._state[stream_id].update(lease=lease, producer=time.time())
            return True

    def log_owner(self, stream_id: str) -> str | None:
        return self._state.get(stream_id, {}).get("owner")

    def append_many(self, batch: dict[str, list[Frame]], closing: tuple[str, ...] = (), ttl: float = 0,
                    leases: dict[str, str] | None = None) -> set[str]:
        leases = leases or {}
        with self._lock:
            fenced = {s for s in {*batch, *closing} if self._taken_from(s, leases.get(s))}
            for stream_id, frames in batch.items():
                if stream_id not in fenced:
                    log = self._logs[stream_id]
                    last = log[-1][0] if log else 0
                    log.extend(f for f in frames if f[0] > last)
            for stream_id in closing:
                if stream_id not in fenced:
                    state = self._state.setdefault(stream_id, {"stop": False})
                    state.update(state="closed", expires=time.time() + ttl)
            self._lock.notify_all()
            return fenced

    def _taken_from(self, stream_id: str, lease: str | None) -> bool:
        held = self._state.get(stream_id, {}).get("lease")
        return bool(lease and held and held != lease)

    def read_log(self, stream_id: str, after: int, timeout: float) -> LogRead:
        with self._lock:
            frames = [f for f in self._logs.get(stream_id, ()) if f[0] > after]
            if not frames and self.log_state(stream_id) == "open":
                self._lock.wait(timeout)
                frames = [f for f in self._logs.get(stream_id, ()) if f[0] > after]
            return LogRead(frames, self.log_state(stream_id))

    def log_state(self, stream_id: str) -> str | None:
        state = self._state.get(stream_id)
        if state is None or state["expires"] < time.time():
            return None
        value: str = state["state"]
        return value

    def request_stop(self, stream_id: str) -> None:
        with self._lock:
            if stream_id in self._state:
                self._state[stream_id]["stop"] = True

    def stop_requested(self, stream_id: str) -> bool:
        return bool(self._state.get(stream_id, {}).get("stop"))

    def stopped_among(self, stream_ids: list[str]) -> set[str]:
        return {s for s in stream_ids if self.stop_requested(s)}

    def touch_many(self, stream_ids: list[str], who: str) -> None:
        for stream_id in stream_ids:
            self.touch(stream_id, who)

    def touch(self, stream_id: str, who: str) -> None:
        if stream_id in self._state:
            self._state[stream_id][who] = time.time()

    def seen_at(self, stream_id: str, who: str) -> float | None:
        return self._state.get(stream_id, {}).get(who)

    def hit(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        with self._lock:
            self._sweep()
            start, count = self._windows.get(key, (0.0, 0))
            if now - start >= window:
                start, count = now - (now % window), 0
            self._windows[key] = (start, count + 1)
            return count + 1, start + window - now

    def acquire(self, key: str, member: str, limit: int, ttl: float) -> bool:
        now = time.time()
        with self._lock:
            slots = {m: e for m, e in self._slots[key].items() if e > now}
            if len(slots) >= limit:
                self._slots[key] = slots
                return False
            slots[member] = now + ttl
            self._slots[key] = slots
            return True

    def refresh(self, slots: list[tuple[str, str]], ttl: float) -> None:
        expires = time.time() + ttl
        with self._lock:
            for key, member in slots:
                if member in self._slots.get(key, {}):
                    self._slots[key][member] = expires

    def release(self, key: str, member: str) -> None:
        with self._lock:
            self._slots.get(key, {}).pop(member, None)

    def release_dropping(self, key: str, member: str, ticket_id: str) -> None:
        with self._lock:
            self._slots.get(key, {}).pop(member, None)
            self._tickets.pop(ticket_id, None)

    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                        owner: str = "") -> ConversationInfo | None:
        texts = [to_json(m) for m in messages]
        now = time.time()
        with self._lock:
            self._sweep()
            if self._tombstones.get(conversation_id, 0) >= now:
                return None
            conv = self._conversations.get(conversation_id)
            if conv is None or conv["expires"] < now:
                conv = self._conversations[conversation_id] = {"owner": owner, "records": [], "bytes": 0}
            conv["records"].extend(texts)
            conv["bytes"] += sum(len(t.encode()) for t in texts)
            conv["expires"] = now + ttl
            return ConversationInfo(conv["owner"], len(conv["records"]), conv["bytes"])

    def conversation(self, conversation_id: str) -> ConversationInfo | None:
        conv = self._conversations.get(conversation_id)
        if conv is None or conv["expires"] < time.time():
            return None
        return ConversationInfo(conv["owner"], len(conv["records"]), conv["bytes"])

    def messages(self, conversation_id: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            conv = self._conversations.get(conversation_id)
            if conv is None or conv["expires"] < time.time():
                return []
            return [json.loads(m) for m in conv["records"][start:stop]]

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._lock:
            conv = self._conversations.pop(conversation_id, None)
            if conv is None or conv["expires"] < time.time():
                return False
            self._tombstones[conversation_id] = conv["expires"]
            return True

    def close(self) -> None:
        pass  # nothing held outside this process's memory
