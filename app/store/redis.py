"""The store for several hosts: Redis (`STORE_URL=redis://host:6379/0`).

Stream logs are Redis Streams (XADD by the producer, XREAD BLOCK by readers anywhere),
tickets are keys taken with GETDEL (exactly one producer), conversations are lists.
What must be decided and written in one step (a producer's lease, a conversation's
tombstone) is a Lua script: Redis runs it whole, with nothing else in between.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis

from app.store.base import ConversationInfo, Frame, LogRead, Store, StoreError, to_json

PREFIX = "llm-sse-relay:"
# Connections per process. A mod_wsgi stream process runs hundreds of threads and a gevent
# worker a thousand greenlets, each holding a connection while it talks to Redis (a log's
# reader for the whole of its blocking XREAD). redis-py's own pool fails the 101st at once
# ("Too many connections"); this one is as large as a process's concurrency, and a caller
# beyond it waits up to POOL_WAIT seconds for a free connection. `?max_connections=` and
# `?timeout=` in STORE_URL win.
POOL_SIZE = 1000
POOL_WAIT = 10.0
# A blocking XREAD waits at most this long at a time: redis-py 8 gives every socket a 5 s
# read timeout, and a longer block (a 15 s heartbeat) failed as "Timeout reading".
XREAD_BLOCK_SECONDS = 2.0

# KEYS: stream record, log. ARGV: lease ("" = none), log ms, close ms ("" = stays open), then
# seq, frame pairs. Refused (0) when another producer took the stream over; frames the log
# already has (a batch written again after a failure) are skipped.
APPEND_LOG = """
local held = redis.call('HGET', KEYS[1], 'lease')
if ARGV[1] ~= '' and held and held ~= '' and held ~= ARGV[1] then return 0 end
local last = 0
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
for i = 4, #ARGV, 2 do
  if tonumber(ARGV[i]) > last then redis.call('XADD', KEYS[2], ARGV[i] .. '-1', 'f', ARGV[i + 1]) end
end
if #ARGV >= 4 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'state', 'closed')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""
# KEYS: ticket, new ticket. ARGV: ms the new one lives.
MOVE_TICKET = """
local payload = redis.call('GETDEL', KEYS[1])
if payload then redis.call('SET', KEYS[2], payload, 'PX', ARGV[1]) end
return payload
"""
# KEYS: stream record. ARGV: lease, now.
TAKE_OVER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'lease', ARGV[1], 'producer', ARGV[2])
return 1
"""
# KEYS: records, info, tombstone. ARGV: owner, bytes, ms, records...
APPEND_CONVERSATION = """
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local count = 0
for i = 4, #ARGV do count = redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('HSETNX', KEYS[2], 'owner', ARGV[1])
local size = redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {count, size, redis.call('HGET', KEYS[2], 'owner')}
"""
# KEYS: records, info, tombstone. The tombstone lives as long as the conversation would have.
DELETE_CONVERSATION = """
local ttl = redis.call('PTTL', KEYS[2])
if ttl == -2 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
if ttl > 0 then redis.call('SET', KEYS[3], 1, 'PX', ttl) end
return 1
"""


def _text(raw: bytes | str | None) -> str | None:
    """A reply as text (this client gets bytes: decode_responses is off)."""
    return raw.decode() if isinstance(raw, bytes) else raw


P = ParamSpec("P")
T = TypeVar("T")


def mapped(method: Callable[Concatenate[RedisStore, P], T]) -> Callable[Concatenate[RedisStore, P], T]:
    """Redis down, restarting, out of memory or read-only (a replica), a pool with no free
    connection: all "the store cannot answer", a `StoreError` like SQLite's, so no caller
    knows which store it talks to. The original stays chained for the log."""

    @functools.wraps(method)
    def call(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"Redis store failed: {type(exc).__name__}: {exc}") from exc

    return call


class RedisStore(Store):
    @mapped
    def __init__(self, url: str) -> None:
        # health_check_interval: notice a restarted Redis on the next call, not after a hang.
        self.pool = redis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=POOL_WAIT,
                                                          health_check_interval=10, socket_connect_timeout=5)
        self.redis = redis.Redis(connection_pool=self.pool)
        self.redis.ping()
        # A log lives as long as its stream record, also when its producer died before closing it.
        self._log_ms = 3_600_000
        self._append_log = self.redis.register_script(APPEND_LOG)
        self._take_over = self.redis.register_script(TAKE_OVER)
        self._move_ticket = self.redis.register_script(MOVE_TICKET)
        self._append_conversation = self.redis.register_script(APPEND_CONVERSATION)
        self._delete_conversation = self.redis.register_script(DELETE_CONVERSATION)

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{PREFIX}{kind}:{name}"

    # -- tickets
    @mapped
    def put_ticket(self, ticket_id: str, payload: dict[str, Any], ttl: float) -> None:
        self.redis.set(self._key("ticket", ticket_id), to_json(payload), px=int(ttl * 1000))

    @mapped
    def take_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        raw = self.redis.getdel(self._key("ticket", ticket_id))
        return json.loads(raw) if raw else None

    @mapped
    def ticket_exists(self, ticket_id: str) -> bool:
        return bool(self.redis.exists(self._key("ticket", ticket_id)))

    @mapped
    def move_ticket(self, ticket_id: str, to_id: str, ttl: float) -> dict[str, Any] | None:
        raw = self._move_ticket(keys=[self._key("ticket", ticket_id), self._key("ticket", to_id)],
                                args=[max(1, int(ttl * 1000))])
        return json.loads(raw) if raw else None

    # -- stream logs
    @mapped
    def open_log(self, stream_id: str, ttl: float, owner: str = "", lease: str = "") -> None:
        self._log_ms = int(ttl * 1000)
        key = self._key("stream", stream_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={"state": "open", "stop": 0, "owner": owner, "lease": lease})
            pipe.pexpire(key, int(ttl * 1000))
            pipe.execute()

    @mapped
    def take_over(self, stream_id: str, lease: str) -> bool:
        return bool(self._take_over(keys=[self._key("stream", stream_id)], args=[lease, time.time()]))

    @mapped
    def append_many(self, batch: dict[str, list[Frame]], closing: tuple[str, ...] = (), ttl: float = 0,
                    leases: dict[str, str] | None = None) -> set[str]:
        leases = leases or {}
        close_ms = str(int(ttl * 1000))
        streams = [*batch, *(s for s in closing if s not in batch)]
        with self.redis.pipeline(transaction=False) as pipe:  # one round trip, one script per stream
            for stream_id in streams:
                pairs = [part for n, frame in batch.get(stream_id, ()) for part in (n, frame)]
                self._append_log(keys=[self._key("stream", stream_id), self._key("log", stream_id)],
                                 args=[leases.get(stream_id, ""), self._log_ms,
                                       close_ms if stream_id in closing else "", *pairs], client=pipe)
            written = pipe.execute()
        return {s for s, ok in zip(streams, written, strict=True) if not ok}

    @mapped
    def stopped_among(self, stream_ids: list[str]) -> set[str]:
        with self.redis.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.hget(self._key("stream", stream_id), "stop")
            flags = pipe.execute()
        return {s for s, flag in zip(stream_ids, flags, strict=True) if flag == b"1"}

    @mapped
    def touch_many(self, stream_ids: list[str], who: str) -> None:
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.hset(self._key("stream", stream_id), who, now)
            pipe.execute()

    @mapped
    def read_log(self, stream_id: str, after: int, timeout: float) -> LogRead:
        deadline = time.monotonic() + timeout
        while True:
            found = self._read_snapshot(stream_id, after)
            left = deadline - time.monotonic()
            if found.frames or found.state != "open" or left <= 0:
                return found
            # Only a wake-up: what came is read again with the state, in one MULTI.
            block = max(1, int(min(left, XREAD_BLOCK_SECONDS) * 1000))
            self.redis.xread({self._key("log", stream_id): f"{after}-1"}, count=1, block=block)

    def _read_snapshot(self, stream_id: str, after: int) -> LogRead:
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: no write lands between the two reads
            pipe.xrange(self._key("log", stream_id), f"{after + 1}-0", "+")
            pipe.hget(self._key("stream", stream_id), "state")
            entries, state = pipe.execute()
        frames = [(int(entry_id.split(b"-")[0]), fields[b"f"]) for entry_id, fields in entries]
        return LogRead(frames, state.decode() if state else None)

    @mapped
    def log_owner(self, stream_id: str) -> str | None:
        return _text(self.redis.hget(self._key("stream", stream_id), "owner"))

    @mapped
    def log_state(self, stream_id: str) -> str | None:
        return _text(self.redis.hget(self._key("stream", stream_id), "state")) or None

    # -- stream control
    @mapped
    def request_stop(self, stream_id: str) -> None:
        self.redis.hset(self._key("stream", stream_id), "stop", 1)

    @mapped
    def stop_requested(self, stream_id: str) -> bool:
        return self.redis.hget(self._key("stream", stream_id), "stop") == b"1"

    @mapped
    def touch(self, stream_id: str, who: str) -> None:
        self.redis.hset(self._key("stream", stream_id), who, time.time())

    @mapped
    def seen_at(self, stream_id: str, who: str) -> float | None:
        seen = self.redis.hget(self._key("stream", stream_id), who)
        return float(seen) if seen else None

    # -- limits
    @mapped
    def hit(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - (now % window)
        name = self._key("hit", f"{key}:{int(start)}")
        with self.redis.pipeline() as pipe:
            pipe.incr(name)
            pipe.pexpire(name, int(window * 1000) + 1000)
            count, _ = pipe.execute()
        return int(count), start + window - now

    # Slots: a sorted set per key, each member scored with its expiry.
    @mapped
    def acquire(self, key: str, member: str, limit: int, ttl: float) -> bool:
        name = self._key("slots", key)
        now = time.time()
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: the count and the add are one step
            pipe.zremrangebyscore(name, "-inf", now)
            pipe.zadd(name, {member: now + ttl})
            pipe.zcard(name)
            pipe.pexpire(name, int(ttl * 1000))
            _, _, count, _ = pipe.execute()
        if count > limit:
            self.redis.zrem(name, member)
            return False
        return True

    @mapped
    def refresh(self, slots: list[tuple[str, str]], ttl: float) -> None:
        expires = time.time() + ttl
        with self.redis.pipeline(transaction=False) as pipe:
            for key, member in slots:
                pipe.zadd(self._key("slots", key), {member: expires}, xx=True)
                pipe.pexpire(self._key("slots", key), int(ttl * 1000))
            pipe.execute()

    @mapped
    def release(self, key: str, member: str) -> None:
        self.redis.zrem(self._key("slots", key), member)

    @mapped
    def release_dropping(self, key: str, member: str, ticket_id: str) -> None:
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: one round trip, nothing in between
            pipe.zrem(self._key("slots", key), member)
            pipe.delete(self._key("ticket", ticket_id))
            pipe.execute()

    # -- conversations: a list of records, and a hash with its owner and size
    @mapped
    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                        owner: str = "") -> ConversationInfo | None:
        texts = [to_json(m) for m in messages]
        keys = [self._key("conversation", conversation_id), self._key("conversation-info", conversation_id),
                self._key("conversation-deleted", conversation_id)]
        size = sum(len(t.encode()) for t in texts)
        found = self._append_conversation(keys=keys, args=[owner, size, int(ttl * 1000), *texts])
        if found is None:
            return None
        count, total, stored_owner = found
        return ConversationInfo(stored_owner.decode(), int(count), int(total))

    @mapped
    def conversation(self, conversation_id: str) -> ConversationInfo | None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._key("conversation-info", conversation_id), "owner", "bytes")
            pipe.llen(self._key("conversation", conversation_id))
            (owner, size), count = pipe.execute()
        if owner is None or not count:
            return None
        return ConversationInfo(owner.decode(), int(count), int(size or 0))

    @mapped
    def messages(self, conversation_id: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        end = -1 if stop is None else stop - 1
        if stop is not None and stop <= start:
            return []
        return [json.loads(m) for m in self.redis.lrange(self._key("conversation", conversation_id), start, end)]

    @mapped
    def delete_conversation(self, conversation_id: str) -> bool:
        keys = [self._key("conversation", conversation_id), self._key("conversation-info", conversation_id),
                self._key("conversation-deleted", conversation_id)]
        return bool(self._delete_conversation(keys=keys))

    @mapped
    def close(self) -> None:
        self.redis.close()
        self.pool.disconnect()
