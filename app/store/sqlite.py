"""The default store: one SQLite file shared by every process on the host.

WAL mode lets readers run while the producer writes; each thread has its own
connection. Stream frames are written in batches by the producer's log writer, so the
per-token path never waits for the disk; readers in other processes poll.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any

from app.store.base import Frame, Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (id TEXT PRIMARY KEY, payload TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, stop INTEGER NOT NULL DEFAULT 0,
    reader_seen REAL, producer_seen REAL, owner TEXT, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS frames (
    stream_id TEXT NOT NULL, seq INTEGER NOT NULL, frame BLOB NOT NULL, PRIMARY KEY (stream_id, seq));
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL, message TEXT NOT NULL,
    expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, n);
"""
# How often a reader in another process looks for new frames.
POLL_SECONDS = 0.05


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._local = threading.local()
        self._last_sweep = 0.0
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # autocommit; busy_timeout: wait for another process's write instead of failing.
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _sweep(self) -> None:
        """Drop what expired, at most once a minute per process."""
        now = time.time()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        db = self._db()
        db.execute("DELETE FROM tickets WHERE expires < ?", (now,))
        db.execute("DELETE FROM frames WHERE stream_id IN (SELECT id FROM streams WHERE expires < ?)", (now,))
        db.execute("DELETE FROM streams WHERE expires < ?", (now,))
        db.execute("DELETE FROM messages WHERE expires < ?", (now,))
        db.execute("DELETE FROM counters WHERE expires < ?", (now,))

    # -- tickets
    def put_ticket(self, ticket_id: str, payload: dict[str, Any], ttl: float) -> None:
        self._sweep()
        self._db().execute("INSERT INTO tickets VALUES (?, ?, ?)", (ticket_id, json.dumps(payload), time.time() + ttl))

    def take_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        row = self._db().execute("DELETE FROM tickets WHERE id = ? RETURNING payload, expires", (ticket_id,)).fetchone()
        if row is None or row[1] < time.time():
            return None
        return json.loads(row[0])

    # -- stream logs
    def open_log(self, stream_id: str, ttl: float, owner: str = "") -> None:
        self._db().execute("INSERT OR REPLACE INTO streams (id, state, owner, expires) VALUES (?, 'open', ?, ?)",
                           (stream_id, owner, time.time() + ttl))

    def log_owner(self, stream_id: str) -> str | None:
        row = self._db().execute("SELECT owner FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return row[0] if row else None

    def append_frames(self, stream_id: str, frames: list[Frame]) -> None:
        db = self._db()
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO frames VALUES (?, ?, ?)", [(stream_id, n, f) for n, f in frames])
        db.execute("COMMIT")

    def read_frames(self, stream_id: str, after: int, timeout: float) -> list[Frame]:
        db = self._db()
        deadline = time.monotonic() + timeout
        while True:
            rows = db.execute("SELECT seq, frame FROM frames WHERE stream_id = ? AND seq > ? ORDER BY seq",
                              (stream_id, after)).fetchall()
            if rows or self.log_state(stream_id) != "open" or time.monotonic() >= deadline:
                return [(n, bytes(f)) for n, f in rows]
            time.sleep(POLL_SECONDS)

    def close_log(self, stream_id: str, ttl: float) -> None:
        self._db().execute("INSERT INTO streams (id, state, expires) VALUES (?, 'closed', ?) "
                           "ON CONFLICT(id) DO UPDATE SET state = 'closed', expires = excluded.expires",
                           (stream_id, time.time() + ttl))

    def log_state(self, stream_id: str) -> str | None:
        row = self._db().execute("SELECT state, expires FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return row[0] if row and row[1] >= time.time() else None

    # -- stream control
    def request_stop(self, stream_id: str) -> None:
        self._db().execute("UPDATE streams SET stop = 1 WHERE id = ?", (stream_id,))

    def stop_requested(self, stream_id: str) -> bool:
        row = self._db().execute("SELECT stop FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return bool(row and row[0])

    def touch(self, stream_id: str, who: str) -> None:
        column = {"reader": "reader_seen", "producer": "producer_seen"}[who]
        self._db().execute(f"UPDATE streams SET {column} = ? WHERE id = ?", (time.time(), stream_id))

    def seen_at(self, stream_id: str, who: str) -> float | None:
        column = {"reader": "reader_seen", "producer": "producer_seen"}[who]
        row = self._db().execute(f"SELECT {column} FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return row[0] if row else None

    # -- limits
    def hit(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - (now % window)
        row = self._db().execute(
            "INSERT INTO counters VALUES (?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
            "count = CASE WHEN expires <= ? THEN 1 ELSE count + 1 END, "
            "expires = CASE WHEN expires <= ? THEN excluded.expires ELSE expires END RETURNING count, expires",
            (f"hit:{key}", start + window, now, now)).fetchone()
        return row[0], row[1] - now

    def acquire(self, key: str, limit: int, ttl: float) -> bool:
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT count, expires FROM counters WHERE key = ?", (f"slot:{key}",)).fetchone()
            count = row[0] if row and row[1] > now else 0
            if count >= limit:
                return False
            db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", (f"slot:{key}", count + 1, now + ttl))
            return True
        finally:
            db.execute("COMMIT")

    def release(self, key: str) -> None:
        self._db().execute("UPDATE counters SET count = MAX(0, count - 1) WHERE key = ?", (f"slot:{key}",))

    # -- conversations
    def append_message(self, conversation_id: str, message: dict[str, Any], ttl: float) -> None:
        db = self._db()
        expires = time.time() + ttl
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO messages (conversation_id, message, expires) VALUES (?, ?, ?)",
                   (conversation_id, json.dumps(message), expires))
        db.execute("UPDATE messages SET expires = ? WHERE conversation_id = ?", (expires, conversation_id))
        db.execute("COMMIT")

    def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT message FROM messages WHERE conversation_id = ? AND expires >= ? ORDER BY n",
                                  (conversation_id, time.time())).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._db().execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,)).rowcount > 0

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
