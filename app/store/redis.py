"""The store for several hosts: Redis (`STORE_URL=redis://host:6379/0`).

Stream logs are Redis Streams (XADD by the producer, XREAD BLOCK by readers anywhere),
tickets are keys taken with GETDEL (exactly one producer), conversations are lists.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from app.store.base import ConversationInfo, Frame, Store, to_json

PREFIX = "llm-sse-relay:"
# Connections per process. A mod_wsgi stream process runs hundreds of threads and a gevent
# worker a thousand greenlets, each holding a connection while it talks to Redis (a log's
# reader for the whole of its blocking XREAD). redis-py's own pool fails the 101st at once
# ("Too many connections"); this one is as large as a process's concurrency, and a caller
# beyond it waits up to POOL_WAIT seconds for a free connection. `?max_connections=` and
# `?timeout=` in STORE_URL win.
POOL_SIZE = 1000
POOL_WAIT = 10.0


class RedisStore(Store):
    def __init__(self, url: str) -> None:
        # health_check_interval: notice a restarted Redis on the next call, not after a hang.
        self.pool = redis.BlockingConnectionPool.from_url(url, max_connections=POOL_SIZE, timeout=POOL_WAIT,
                                                          health_check_interval=10, socket_connect_timeout=5)
        self.redis = redis.Redis(connection_pool=self.pool)
        self.redis.ping()
        # A log lives as long as its stream record, also when its producer died before closing it.
        self._log_ms = 3_600_000

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{PREFIX}{kind}:{name}"

    # -- tickets
    def put_ticket(self, ticket_id: str, payload: dict[str, Any], ttl: float) -> None:
        self.redis.set(self._key("ticket", ticket_id), to_json(payload), px=int(ttl * 1000))

    def take_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        raw = self.redis.getdel(self._key("ticket", ticket_id))
        return json.loads(raw) if raw else None

    # -- stream logs
    def open_log(self, stream_id: str, ttl: float, owner: str = "") -> None:
        self._log_ms = int(ttl * 1000)
        key = self._key("stream", stream_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={"state": "open", "stop": 0, "owner": owner})
            pipe.pexpire(key, int(ttl * 1000))
            pipe.execute()

    def append_frames(self, stream_id: str, frames: list[Frame]) -> None:
        key = self._key("log", stream_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for n, frame in frames:
                pipe.xadd(key, {"f": frame}, id=f"{n}-1")
            pipe.pexpire(key, self._log_ms)
            pipe.execute()

    def append_many(self, batch: dict[str, list[Frame]], closing: tuple[str, ...] = (), ttl: float = 0) -> None:
        ms = int(ttl * 1000)
        with self.redis.pipeline(transaction=False) as pipe:
            for stream_id, frames in batch.items():
                key = self._key("log", stream_id)
                for n, frame in frames:
                    pipe.xadd(key, {"f": frame}, id=f"{n}-1")
                pipe.pexpire(key, self._log_ms)
            for stream_id in closing:  # after its frames, in the same round trip
                pipe.hset(self._key("stream", stream_id), "state", "closed")
                pipe.pexpire(self._key("stream", stream_id), ms)
                pipe.pexpire(self._key("log", stream_id), ms)
            pipe.execute()

    def stopped_among(self, stream_ids: list[str]) -> set[str]:
        with self.redis.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.hget(self._key("stream", stream_id), "stop")
            flags = pipe.execute()
        return {s for s, flag in zip(stream_ids, flags, strict=True) if flag == b"1"}

    def touch_many(self, stream_ids: list[str], who: str) -> None:
        now = time.time()
        with self.redis.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.hset(self._key("stream", stream_id), who, now)
            pipe.execute()

    def read_frames(self, stream_id: str, after: int, timeout: float) -> list[Frame]:
        key = self._key("log", stream_id)
        found = self.redis.xread({key: f"{after}-1"}, block=max(1, int(timeout * 1000)))
        if not found:
            return []
        return [(int(entry_id.split(b"-")[0]), fields[b"f"]) for entry_id, fields in found[0][1]]

    def close_log(self, stream_id: str, ttl: float) -> None:
        ms = int(ttl * 1000)
        with self.redis.pipeline() as pipe:
            pipe.hset(self._key("stream", stream_id), "state", "closed")
            pipe.pexpire(self._key("stream", stream_id), ms)
            pipe.pexpire(self._key("log", stream_id), ms)
            pipe.execute()

    def log_owner(self, stream_id: str) -> str | None:
        owner = self.redis.hget(self._key("stream", stream_id), "owner")
        return owner.decode() if owner is not None else None

    def log_state(self, stream_id: str) -> str | None:
        state = self.redis.hget(self._key("stream", stream_id), "state")
        return state.decode() if state else None

    # -- stream control
    def request_stop(self, stream_id: str) -> None:
        self.redis.hset(self._key("stream", stream_id), "stop", 1)

    def stop_requested(self, stream_id: str) -> bool:
        return self.redis.hget(self._key("stream", stream_id), "stop") == b"1"

    def touch(self, stream_id: str, who: str) -> None:
        self.redis.hset(self._key("stream", stream_id), who, time.time())

    def seen_at(self, stream_id: str, who: str) -> float | None:
        seen = self.redis.hget(self._key("stream", stream_id), who)
        return float(seen) if seen else None

    # -- limits
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

    def refresh(self, slots: list[tuple[str, str]], ttl: float) -> None:
        expires = time.time() + ttl
        with self.redis.pipeline(transaction=False) as pipe:
            for key, member in slots:
                pipe.zadd(self._key("slots", key), {member: expires}, xx=True)
                pipe.pexpire(self._key("slots", key), int(ttl * 1000))
            pipe.execute()

    def release(self, key: str, member: str) -> None:
        self.redis.zrem(self._key("slots", key), member)

    # -- conversations: a list of records, and a hash with its owner and size
    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                        owner: str = "") -> ConversationInfo:
        texts = [to_json(m) for m in messages]
        records, meta = self._key("conversation", conversation_id), self._key("conversation-info", conversation_id)
        ms = int(ttl * 1000)
        with self.redis.pipeline() as pipe:  # MULTI/EXEC: records and size change together
            pipe.rpush(records, *texts)
            pipe.hsetnx(meta, "owner", owner)
            pipe.hincrby(meta, "bytes", sum(len(t.encode()) for t in texts))
            pipe.pexpire(records, ms)
            pipe.pexpire(meta, ms)
            pipe.hget(meta, "owner")
            count, _, size, _, _, stored_owner = pipe.execute()
        return ConversationInfo(stored_owner.decode(), int(count), int(size))

    def conversation(self, conversation_id: str) -> ConversationInfo | None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._key("conversation-info", conversation_id), "owner", "bytes")
            pipe.llen(self._key("conversation", conversation_id))
            (owner, size), count = pipe.execute()
        if owner is None or not count:
            return None
        return ConversationInfo(owner.decode(), int(count), int(size or 0))

    def messages(self, conversation_id: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        end = -1 if stop is None else stop - 1
        if stop is not None and stop <= start:
            return []
        return [json.loads(m) for m in self.redis.lrange(self._key("conversation", conversation_id), start, end)]

    def delete_conversation(self, conversation_id: str) -> bool:
        removed = self.redis.delete(self._key("conversation", conversation_id),
                                    self._key("conversation-info", conversation_id))
        return bool(removed)

    def close(self) -> None:
        self.redis.close()
        self.pool.disconnect()
