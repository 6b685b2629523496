"""The default store: one SQLite file shared by every process on the host.

WAL mode lets readers run while the producer writes. Each process has one connection
for its writes (they take turns anyway) and a few for reads, lent to whichever thread
reads: not one per thread, which under mod_wsgi cost ~160 kB per request thread. Stream
frames are written in batches by the producer's log writer, so the per-token path never
waits for the disk; readers in other processes poll.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from app.gevent_native import gevent_threadpool, unpatched
from app.store import base
from app.store.base import ConversationInfo, Frame, LogRead, Store, StoreError, to_json

log = logging.getLogger("llm_sse_relay.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (id TEXT PRIMARY KEY, payload TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, stop INTEGER NOT NULL DEFAULT 0,
    reader_seen REAL, producer_seen REAL, owner TEXT, expires REAL NOT NULL, lease TEXT);
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS slots (key TEXT NOT NULL, member TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, member));
CREATE TABLE IF NOT EXISTS frames (
    stream_id TEXT NOT NULL, seq INTEGER NOT NULL, frame BLOB NOT NULL, PRIMARY KEY (stream_id, seq));
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL, message TEXT NOT NULL,
    expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, n);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, count INTEGER NOT NULL, bytes INTEGER NOT NULL,
    expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (id TEXT PRIMARY KEY, expires REAL NOT NULL);
"""
# Columns added since a file may have been created: (table, column, definition).
ADDED_COLUMNS = [("streams", "lease", "TEXT")]
# How often a reader in another process looks for new frames.
POLL_SECONDS = 0.05
# Longest wait for another process's write lock before giving up.
LOCK_WAIT_SECONDS = 10.0
SWEEP_SECONDS = base.SWEEP_SECONDS
T = TypeVar("T")


def _is_lock_wait(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _store_error(exc: sqlite3.Error) -> StoreError:
    """Any other SQLite failure (disk full, read-only file, corruption) is the store being
    unavailable: a 503 for the caller, the details for the log."""
    log.warning("SQLite store failed: %s", exc)
    return StoreError(f"SQLite store failed: {exc}")


def execute_each(db: sqlite3.Connection, sql: str, rows: Iterable[Sequence[Any]]) -> None:
    """`db.executemany(sql, rows)`, one `execute` a row, in the caller's transaction. Called from
    gevent's native thread pool (where every SQLite call of the gevent worker ran until
    2026-12), `executemany` on the write connection failed now and then with SQLITE_MISUSE
    ("bad parameter or other API misuse"): 1-3 streams of a few thousand in the bench ended
    with an error event. Rows one by one (the statement is cached) never did, in the same
    stress test, which still runs (a contended write still goes to a native thread)."""
    for row in rows:
        db.execute(sql, row)


# Rows one multi-row INSERT carries: 300 bound parameters for frames, under the oldest
# SQLite's limit (999).
ROWS_PER_INSERT = 100


def insert_rows(db: sqlite3.Connection, insert: str, rows: Sequence[Sequence[Any]]) -> None:
    """`insert` (up to its "VALUES") for every row, up to ROWS_PER_INSERT rows a statement.

    One statement is one step of SQLite, and one release of the GIL while it runs: the log
    flusher writes about one frame per open stream every tick, and under mod_wsgi each release
    handed the GIL to one of hundreds of stream threads, then waited to get it back. In one
    thread alone a row costs less too (6.8 against 5.0-6.1 µs, 250 rows a transaction)."""
    if not rows:
        return
    group = "(" + ",".join("?" * len(rows[0])) + ")"
    for i in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[i:i + ROWS_PER_INSERT]
        db.execute(insert + ",".join([group] * len(chunk)), [value for row in chunk for value in row])


# Under gunicorn's gevent worker, SQLite is called on the event loop itself: a read or a write
# takes ~0.1 ms there, less than handing it to a native thread and back, which under a burst
# (the loop always busy, the thread waiting up to a GIL switch interval for each step) made
# every call wait ~100 ms in the thread pool's queue (p50 of 2,000 calls, 500 POST-SSE streams
# opened in a second). Only what can block goes to gevent's native threads: a write that finds
# another process writing (it waits there), and the WAL checkpoint (it syncs the disk).
_gevent_pool = gevent_threadpool()
# How often, at most, a checkpoint is started after a commit under gevent.
CHECKPOINT_SECONDS = 1.0
_native_sleep = unpatched("time", "sleep")

# Read connections a process keeps between reads. More readers at one instant open more,
# closed again when returned past this number. A connection holds ~160 kB (SQLite's
# lookaside, schema and statement caches), and mod_wsgi keeps hundreds of threads alive.
IDLE_READERS = 8


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._writer: sqlite3.Connection | None = None  # used under _write_lock only
        self._readers: list[sqlite3.Connection] = []  # idle; list.pop/append are atomic
        self._pid = os.getpid()
        self._last_sweep = time.time()
        # Writers of this process queue here, in order, so only one of them at a time
        # competes for SQLite's file lock with the other processes (hundreds of mod_wsgi
        # threads polling that lock starve each other).
        # (Under gevent, gevent's lock: its holder may wait cooperatively for another process.)
        self._write_lock = threading.Lock()
        self._last_checkpoint = time.monotonic()
        self._create_schema()

    def _create_schema(self) -> None:
        with self._write_lock:
            db = self._write_db()
            self._retry_locked(lambda: db.execute("BEGIN IMMEDIATE"))
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                for table, column, definition in ADDED_COLUMNS:
                    if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                db.execute("ROLLBACK")
                raise _store_error(exc) from exc

    def _connect(self) -> sqlite3.Connection:
        # Autocommit, and no busy timeout: SQLite's own busy handler sleeps inside C,
        # which would stall every stream of a gevent worker; _write waits politely.
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            # Switching a fresh file to WAL takes its lock: several workers starting at once
            # meet "database is locked" here, so this waits like every other write.
            self._retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.execute("PRAGMA synchronous=NORMAL")
            if _gevent_pool is not None:
                db.execute("PRAGMA wal_autocheckpoint=0")  # a checkpoint syncs the disk: _checkpoint_if_due
        except BaseException:
            db.close()
            raise
        return db

    def _forget_connections_of_parent(self) -> None:
        """A process forked after the store was opened (gunicorn --preload) must not use, or
        close, its parent's connections: SQLite's locks would be shared by two processes."""
        if self._pid != os.getpid():
            self._inherited = [self._writer, *self._readers]  # kept, never closed here
            self._pid, self._writer, self._readers = os.getpid(), None, []

    def _write_db(self) -> sqlite3.Connection:
        self._forget_connections_of_parent()
        if self._writer is None:
            self._writer = self._connect()
        return self._writer

    @contextmanager
    def _read_db(self) -> Iterator[sqlite3.Connection]:
        self._forget_connections_of_parent()
        try:
            db = self._readers.pop()
        except IndexError:
            db = self._connect()
        try:
            yield db
        finally:
            if len(self._readers) < IDLE_READERS:
                self._readers.append(db)
            else:
                db.close()

    @staticmethod
    def _retry_locked(call: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        delay = 0.001
        while True:
            try:
                return call()
            except sqlite3.OperationalError as exc:
                if not _is_lock_wait(exc):
                    raise _store_error(exc) from exc
                if time.monotonic() > deadline:
                    raise StoreError(f"SQLite store locked by another process for {LOCK_WAIT_SECONDS:g} s") from exc
                sleep(delay)  # gevent-aware when patched: other streams run meanwhile
                delay = min(delay * 2, 0.02)

    @staticmethod
    def _on_native_thread(call: Callable[[], T]) -> T:
        """`call` on one of gevent's native threads, waited for to its end. The calling greenlet
        holds the write lock meanwhile: killed while it waits (gunicorn ending a worker's
        handlers), it must not release the lock, and the write connection with it, while the
        thread is still in its transaction."""
        assert _gevent_pool is not None
        task = _gevent_pool().spawn(call)
        try:
            result: T = task.get()
            return result
        except BaseException:
            while not task.ready():
                try:
                    task.wait()
                except BaseException:  # interrupted again: the thread still has the connection
                    pass
            raise

    def _checkpoint_if_due(self, db: sqlite3.Connection) -> None:
        """Under gevent, copy the WAL back into the database at most every CHECKPOINT_SECONDS,
        on a native thread (the loop's commits never do it: wal_autocheckpoint is off there, as
        a checkpoint syncs the disk). Called with this process's write lock held, as SQLite's
        own checkpoint runs in the committing connection: no write of this process lands
        meanwhile, so the pass completes and the next write starts the WAL over."""
        if _gevent_pool is None or time.monotonic() - self._last_checkpoint < CHECKPOINT_SECONDS:
            return
        self._last_checkpoint = time.monotonic()
        try:
            self._on_native_thread(lambda: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        except sqlite3.Error as exc:
            log.warning("SQLite checkpoint failed: %s", exc)

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction, waiting for other processes cooperatively."""
        if not self._write_lock.acquire(timeout=LOCK_WAIT_SECONDS):
            raise StoreError(f"SQLite store busy for {LOCK_WAIT_SECONDS:g} s (writers of this process)")
        try:
            db = self._write_db()
            if _gevent_pool is None:
                self._retry_locked(lambda: db.execute("BEGIN IMMEDIATE"))
                return self._in_transaction(db, work)
            try:
                db.execute("BEGIN IMMEDIATE")  # no busy timeout: at once, or "locked"
            except sqlite3.OperationalError as exc:
                if not _is_lock_wait(exc):
                    raise _store_error(exc) from exc
                # Another process is writing: wait for it on a native thread, which wakes the
                # moment its turn comes (on the loop, a wake-up waits for every stream ready
                # before it, and this process's other writers behind it).
                result = self._on_native_thread(lambda: self._locked_write(db, work))
            else:
                result = self._in_transaction(db, work)
            self._checkpoint_if_due(db)
            return result
        finally:
            self._write_lock.release()

    def _locked_write(self, db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
        self._retry_locked(lambda: db.execute("BEGIN IMMEDIATE"), _native_sleep)
        return self._in_transaction(db, work)

    def _in_transaction(self, db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` and the COMMIT, in the write transaction `db` has just begun."""
        try:
            if time.time() - self._last_sweep >= SWEEP_SECONDS:
                self._sweep(db)  # whatever routes run, expiry runs with them
            result = work(db)
            db.execute("COMMIT")
            return result
        except BaseException as exc:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(exc, sqlite3.Error):
                raise _store_error(exc) from exc
            raise

    def _query(self, sql: str, params: Any = ()) -> list[Any]:
        """A read; WAL readers rarely wait, but a checkpoint can make them (then: politely)."""
        try:
            with self._read_db() as db:
                return self._retry_locked(lambda: db.execute(sql, params).fetchall())
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    def _snapshot(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Several reads in one read transaction: in WAL mode they all see the database as
        it was at the first, whatever other processes commit meanwhile."""
        def run(db: sqlite3.Connection) -> T:
            db.execute("BEGIN")
            try:
                return work(db)
            finally:
                db.execute("COMMIT")

        try:
            with self._read_db() as db:
                return self._retry_locked(lambda: run(db))
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc

    def _sweep(self, db: sqlite3.Connection) -> None:
        """Drop what expired (inside a write transaction, at most every SWEEP_SECONDS per process)."""
        now = self._last_sweep = time.time()
        db.execute("DELETE FROM tickets WHERE expires < ?", (now,))
        db.execute("DELETE FROM frames WHERE stream_id IN (SELECT id FROM streams WHERE expires < ?)", (now,))
        db.execute("DELETE FROM streams WHERE expires < ?", (now,))
        # A conversation expires as a whole, CONVERSATION_TTL after its last message.
        db.execute("DELETE FROM messages WHERE conversation_id IN (SELECT id FROM conversations WHERE expires < ?)",
                   (now,))
        db.execute("DELETE FROM conversations WHERE expires < ?", (now,))
        db.execute("DELETE FROM tombstones WHERE expires < ?", (now,))
        # Records written before conversations had owners (no row there) expire by their own date.
        db.execute("DELETE FROM messages WHERE expires < ? AND conversation_id NOT IN (SELECT id FROM conversations)",
                   (now,))
        db.execute("DELETE FROM counters WHERE expires < ?", (now,))
        db.execute("DELETE FROM slots WHERE expires < ?", (now,))

    # -- tickets
    def put_ticket(self, ticket_id: str, payload: dict[str, Any], ttl: float) -> None:
        row = (ticket_id, to_json(payload), time.time() + ttl)
        self._write(lambda db: db.execute("INSERT INTO tickets VALUES (?, ?, ?)", row))

    def take_ticket(self, ticket_id: str) -> dict[str, Any] | None:
        row = self._write(lambda db: db.execute("DELETE FROM tickets WHERE id = ? RETURNING payload, expires",
                                                (ticket_id,)).fetchone())
        if row is None or row[1] < time.time():
            return None
        payload: dict[str, Any] = json.loads(row[0])
        return payload

    def move_ticket(self, ticket_id: str, to_id: str, ttl: float) -> dict[str, Any] | None:
        def move(db: sqlite3.Connection) -> str | None:
            now = time.time()
            row = db.execute("DELETE FROM tickets WHERE id = ? RETURNING payload, expires", (ticket_id,)).fetchone()
            if row is None or row[1] < now:
                return None
            payload: str = row[0]
            db.execute("INSERT OR REPLACE INTO tickets VALUES (?, ?, ?)", (to_id, payload, now + ttl))
            return payload

        raw = self._write(move)
        if raw is None:
            return None
        moved: dict[str, Any] = json.loads(raw)
        return moved

    def ticket_exists(self, ticket_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM tickets WHERE id = ? AND expires >= ?", (ticket_id, time.time())))

    # -- stream logs
    def open_log(self, stream_id: str, ttl: float, owner: str = "", lease: str = "") -> None:
        row = (stream_id, owner, time.time() + ttl, lease)
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO streams (id, state, owner, expires, lease) VALUES (?, 'open', ?, ?, ?)", row))

    def take_over(self, stream_id: str, lease: str) -> bool:
        row = (lease, time.time(), stream_id, time.time())
        return self._write(lambda db: db.execute(
            "UPDATE streams SET lease = ?, producer_seen = ? WHERE id = ? AND expires >= ?", row).rowcount > 0)

    def log_owner(self, stream_id: str) -> str | None:
        row = next(iter(self._query("SELECT owner FROM streams WHERE id = ?", (stream_id,))), None)
        return row[0] if row else None

    def append_many(self, batch: dict[str, list[Frame]], closing: tuple[str, ...] = (), ttl: float = 0,
                    leases: dict[str, str] | None = None) -> set[str]:
        leases = leases or {}
        expires = time.time() + ttl
        leased = [s for s in {*batch, *closing} if leases.get(s)]

        def write(db: sqlite3.Connection) -> set[str]:
            # Checked in the transaction that writes: a take-over commits before or after it, never between.
            fenced: set[str] = set()
            for i in range(0, len(leased), 500):  # SQLite's limit on bound parameters
                chunk = leased[i:i + 500]
                rows = db.execute(f"SELECT id, lease FROM streams WHERE id IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchall()
                fenced.update(s for s, held in rows if held and held != leases[s])
            insert_rows(db, "INSERT OR IGNORE INTO frames VALUES ",
                        [(s, n, f) for s, frames in batch.items() if s not in fenced for n, f in frames])
            execute_each(db, "INSERT INTO streams (id, state, expires) VALUES (?, 'closed', ?) "
                         "ON CONFLICT(id) DO UPDATE SET state = 'closed', expires = excluded.expires",
                         [(s, expires) for s in closing if s not in fenced])
            return fenced

        return self._write(write)

    def stopped_among(self, stream_ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(stream_ids), 500):  # SQLite's limit on bound parameters
            chunk = stream_ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT id FROM streams WHERE stop = 1 AND id IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        return found

    def touch_many(self, stream_ids: list[str], who: str) -> None:
        column = {"reader": "reader_seen", "producer": "producer_seen"}[who]
        rows = [(time.time(), s) for s in stream_ids]
        self._write(lambda db: execute_each(db, f"UPDATE streams SET {column} = ? WHERE id = ?", rows))

    def read_log(self, stream_id: str, after: int, timeout: float) -> LogRead:
        def read(db: sqlite3.Connection) -> LogRead:
            rows = db.execute("SELECT seq, frame FROM frames WHERE stream_id = ? AND seq > ? ORDER BY seq",
                              (stream_id, after)).fetchall()
            state = db.execute("SELECT state FROM streams WHERE id = ? AND expires >= ?",
                               (stream_id, time.time())).fetchone()
            return LogRead([(n, bytes(f)) for n, f in rows], state[0] if state else None)

        deadline = time.monotonic() + timeout
        while True:
            found = self._snapshot(read)
            if found.frames or found.state != "open" or time.monotonic() >= deadline:
                return found
            time.sleep(POLL_SECONDS)

    def log_state(self, stream_id: str) -> str | None:
        row = next(iter(self._query("SELECT state, expires FROM streams WHERE id = ?", (stream_id,))), None)
        return row[0] if row and row[1] >= time.time() else None

    # -- stream control
    def request_stop(self, stream_id: str) -> None:
        self._write(lambda db: db.execute("UPDATE streams SET stop = 1 WHERE id = ?", (stream_id,)))

    def stop_requested(self, stream_id: str) -> bool:
        row = next(iter(self._query("SELECT stop FROM streams WHERE id = ?", (stream_id,))), None)
        return bool(row and row[0])

    def touch(self, stream_id: str, who: str) -> None:
        column = {"reader": "reader_seen", "producer": "producer_seen"}[who]
        row = (time.time(), stream_id)
        self._write(lambda db: db.execute(f"UPDATE streams SET {column} = ? WHERE id = ?", row))

    def seen_at(self, stream_id: str, who: str) -> float | None:
        column = {"reader": "reader_seen", "producer": "producer_seen"}[who]
        row = next(iter(self._query(f"SELECT {column} FROM streams WHERE id = ?", (stream_id,))), None)
        return row[0] if row else None

    # -- limits
    def hit(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - (now % window)
        row = self._write(lambda db: db.execute(
            "INSERT INTO counters VALUES (?, 1, ?) ON CONFLICT(key) DO UPDATE SET "
            "count = CASE WHEN expires <= ? THEN 1 ELSE count + 1 END, "
            "expires = CASE WHEN expires <= ? THEN excluded.expires ELSE expires END RETURNING count, expires",
            (f"hit:{key}", start + window, now, now)).fetchone())
        return row[0], row[1] - now

    def acquire(self, key: str, member: str, limit: int, ttl: float) -> bool:
        now = time.time()

        def take(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM slots WHERE key = ? AND expires <= ?", (key, now))
            (count,) = db.execute("SELECT COUNT(*) FROM slots WHERE key = ?", (key,)).fetchone()
            if count >= limit:
                return False
            db.execute("INSERT OR REPLACE INTO slots VALUES (?, ?, ?)", (key, member, now + ttl))
            return True

        return self._write(take)

    def refresh(self, slots: list[tuple[str, str]], ttl: float) -> None:
        rows = [(time.time() + ttl, key, member) for key, member in slots]
        self._write(lambda db: execute_each(db, "UPDATE slots SET expires = ? WHERE key = ? AND member = ?", rows))

    def release(self, key: str, member: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM slots WHERE key = ? AND member = ?", (key, member)))

    def release_dropping(self, key: str, member: str, ticket_id: str) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM slots WHERE key = ? AND member = ?", (key, member))
            db.execute("DELETE FROM tickets WHERE id = ?", (ticket_id,))

        self._write(release)

    # -- conversations
    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                        owner: str = "") -> ConversationInfo | None:
        return self._write(self._appending(conversation_id, messages, ttl, owner))

    def append_message_releasing(self, conversation_id: str, message: dict[str, Any], ttl: float, owner: str,
                                 slot: tuple[str, str] | None, ticket_id: str) -> ConversationInfo | None:
        append = self._appending(conversation_id, [message], ttl, owner)

        def end(db: sqlite3.Connection) -> ConversationInfo | None:
            if slot is not None:
                db.execute("DELETE FROM slots WHERE key = ? AND member = ?", slot)
            db.execute("DELETE FROM tickets WHERE id = ?", (ticket_id,))
            return append(db)

        return self._write(end)

    def _appending(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                   owner: str) -> Callable[[sqlite3.Connection], ConversationInfo | None]:
        """The write transaction's work of `append_messages`."""
        texts = [to_json(m) for m in messages]
        size = sum(len(t.encode()) for t in texts)
        now = time.time()
        expires = now + ttl

        def append(db: sqlite3.Connection) -> ConversationInfo | None:
            deleted, was_expiring = db.execute(
                "SELECT (SELECT 1 FROM tombstones WHERE id = ? AND expires >= ?), "
                "(SELECT expires FROM conversations WHERE id = ?)", (conversation_id, now, conversation_id)).fetchone()
            if deleted:
                return None
            if was_expiring is not None and was_expiring < now:
                # Expired, and not swept yet: it starts over. (Looked up first: a DELETE of its
                # messages on every append walked all of them, however long the conversation.)
                db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
                db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            execute_each(db, "INSERT INTO messages (conversation_id, message, expires) VALUES (?, ?, ?)",
                         [(conversation_id, t, expires) for t in texts])
            row = db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "count = count + excluded.count, bytes = bytes + excluded.bytes, expires = excluded.expires "
                "RETURNING owner, count, bytes", (conversation_id, owner, len(texts), size, expires)).fetchone()
            return ConversationInfo(*row)

        return append

    def start_conversation(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float, owner: str,
                           ticket: base.Ticket | None = None) -> ConversationInfo:
        # Two statements and the ticket's own transaction fewer than append_messages then put_ticket.
        texts = [to_json(m) for m in messages]
        size = sum(len(t.encode()) for t in texts)
        now = time.time()
        kept = None if ticket is None else (ticket[0], to_json(ticket[1]), now + ticket[2])

        def start(db: sqlite3.Connection) -> None:
            execute_each(db, "INSERT INTO messages (conversation_id, message, expires) VALUES (?, ?, ?)",
                         [(conversation_id, t, now + ttl) for t in texts])
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                       (conversation_id, owner, len(texts), size, now + ttl))
            if kept is not None:
                db.execute("INSERT INTO tickets VALUES (?, ?, ?)", kept)

        self._write(start)
        return ConversationInfo(owner, len(texts), size)

    def conversation(self, conversation_id: str) -> ConversationInfo | None:
        row = next(iter(self._query("SELECT owner, count, bytes, expires FROM conversations WHERE id = ?",
                                    (conversation_id,))), None)
        if row is None or row[3] < time.time():
            return None
        return ConversationInfo(row[0], row[1], row[2])

    def messages(self, conversation_id: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        limit = -1 if stop is None else max(0, stop - start)
        rows = self._query("SELECT m.message FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                           "WHERE m.conversation_id = ? AND c.expires >= ? ORDER BY m.n LIMIT ? OFFSET ?",
                           (conversation_id, time.time(), limit, start))
        return [json.loads(r[0]) for r in rows]

    def delete_conversation(self, conversation_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            row = db.execute("DELETE FROM conversations WHERE id = ? RETURNING expires", (conversation_id,)).fetchone()
            if row is None or row[0] < time.time():
                return False
            db.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", (conversation_id, row[0]))
            return True

        return self._write(delete)

    def close(self) -> None:
        """Close the connections not in use (for the end of a process or a test)."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        while self._readers:
            self._readers.pop().close()
