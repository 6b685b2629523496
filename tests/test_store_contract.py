"""One contract, three stores: memory, SQLite and a real redis-server behave alike.

Everything the app asks of a store is here (tickets, stream logs and batches, stop flags,
liveness, counters, slots, conversations with owners and sizes, expiry), so a store change
made for speed cannot change behaviour unnoticed.
"""

from __future__ import annotations

import os
import time

import pytest

from app.relay import StoreLogView
from app.sse import HEARTBEAT, SseBody
from app.store import MemoryStore, open_store
from app.store import base as store_base
from app.store import sqlite as sqlite_store
from app.store.base import StoreError


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        yield open_store(f"sqlite:///{tmp_path}/contract.sqlite3", str(tmp_path))
    else:
        server = request.getfixturevalue("redis_server")
        server.flush()
        store = open_store(server.url, "")
        yield store
        store.close()


def test_tickets_are_taken_once_and_expire(store):
    store.put_ticket("t1", {"prompt": "hi", "text": "漢字 🚀"}, ttl=60)
    store.put_ticket("t2", {"prompt": "old"}, ttl=0.05)
    assert store.ticket_exists("t1") and not store.ticket_exists("never")
    assert store.take_ticket("t1") == {"prompt": "hi", "text": "漢字 🚀"}
    assert store.take_ticket("t1") is None and not store.ticket_exists("t1")
    time.sleep(0.1)
    assert not store.ticket_exists("t2") and store.take_ticket("t2") is None
    assert store.take_ticket("never") is None


def test_a_ticket_moves_to_a_new_id_once_in_one_step(store):
    store.put_ticket("t", {"prompt": "漢字"}, ttl=60)
    assert store.move_ticket("t", "adopt:t", ttl=60) == {"prompt": "漢字"}
    assert not store.ticket_exists("t") and store.move_ticket("t", "adopt:t", ttl=60) is None
    assert store.take_ticket("adopt:t") == {"prompt": "漢字"}  # still there after the second, refused move
    store.put_ticket("old", {"prompt": "x"}, ttl=0.05)
    time.sleep(0.1)
    assert store.move_ticket("old", "adopt:old", ttl=60) is None and not store.ticket_exists("adopt:old")
    store.put_ticket("short", {"prompt": "y"}, ttl=60)
    store.move_ticket("short", "adopt:short", ttl=0.05)  # the new id keeps the new ttl
    time.sleep(0.1)
    assert not store.ticket_exists("adopt:short") and store.take_ticket("adopt:short") is None


def test_a_slot_is_given_back_and_a_ticket_dropped_in_one_step(store):
    assert store.acquire("c", "s1", 1, 60)
    store.put_ticket("adopt:s1", {"prompt": "x"}, ttl=60)
    store.release_dropping("c", "s1", "adopt:s1")
    assert not store.ticket_exists("adopt:s1") and store.acquire("c", "s2", 1, 60)
    store.release_dropping("c", "gone", "never")  # neither there: nothing to do, no error
    assert not store.acquire("c", "s3", 1, 60)


def test_a_batch_larger_than_one_statement_keeps_every_frame_in_order_and_the_first_of_a_repeat(store):
    """The SQLite store inserts frames many rows a statement (ROWS_PER_INSERT, 100): batches
    across that bound, for many streams at once, with a frame written again after a failed
    batch (the repeat must not replace what the store has)."""
    ids = [f"s{n}" for n in range(7)]
    for sid in ids:
        store.open_log(sid, ttl=60)
    store.append_many({sid: [(i, b"%s-%d" % (sid.encode(), i)) for i in range(1, 40)] for sid in ids})
    store.append_many({sid: [(39, b"again"), *[(i, b"%s-%d" % (sid.encode(), i)) for i in range(40, 251)]]
                       for sid in ids}, closing=tuple(ids), ttl=60)
    for sid in ids:
        assert store.read_frames(sid, 0, 0) == [(i, b"%s-%d" % (sid.encode(), i)) for i in range(1, 251)]
        assert store.log_state(sid) == "closed"


def test_stream_logs_batches_and_states(store):
    store.open_log("s", ttl=60, owner="me")
    assert store.log_state("s") == "open" and store.log_owner("s") == "me"
    store.append_frames("s", [(1, b"a"), (2, b"b")])
    assert store.read_frames("s", 0, 0) == [(1, b"a"), (2, b"b")]
    assert store.read_frames("s", 1, 0) == [(2, b"b")]
    assert store.read_frames("s", 2, 0.05) == []
    assert store.read_frames("s", 99, 0.05) == []  # beyond the log: nothing, after the wait
    store.open_log("t", ttl=60)
    store.append_many({"s": [(3, b"c")], "t": [(1, b"x")]}, closing=("t",), ttl=60)
    assert store.read_frames("s", 2, 0) == [(3, b"c")]
    assert store.log_state("t") == "closed" and store.read_frames("t", 0, 0) == [(1, b"x")]
    store.close_log("s", ttl=60)
    assert store.log_state("s") == "closed" and store.log_state("nope") is None
    assert store.log_owner("nope") is None


class FinalFlushAfterFirstRead:
    """The store as a reader in another process sees it when the producer's final flush (its
    last frames and "closed", written together) lands right after the reader's first question:
    forces, every time, the race a real server hit once in 17 resumes."""

    def __init__(self, store, final_flush) -> None:
        self.store = store
        self.final_flush = final_flush

    def __getattr__(self, name):
        method = getattr(self.store, name)
        if name not in ("read_frames", "read_log"):
            return method

        def read(*args, **kwargs):
            result = method(*args, **kwargs)
            flush, self.final_flush = self.final_flush, None
            if flush is not None:
                flush()
            return result

        return read


def test_the_end_of_a_stream_is_never_lost_to_a_reader_elsewhere(store):
    store.open_log("s", ttl=60)
    store.append_many({"s": [(1, b"token-1")]})
    racing = FinalFlushAfterFirstRead(store, lambda: store.append_many(
        {"s": [(2, b"token-2"), (3, b"done")]}, closing=("s",), ttl=60))
    body = SseBody(StoreLogView(racing, "s"), heartbeat=0.05, position=1, retry=False)
    sent = [chunk for _, chunk in zip(range(100), body, strict=False) if chunk != HEARTBEAT]
    assert b"".join(sent) == b"token-2done" and body.completed


def test_a_log_is_read_with_its_state_in_one_snapshot(store):
    assert store.read_log("nope", 0, 0) == store_base.LogRead([], None)
    store.open_log("s", ttl=60)
    store.append_many({"s": [(1, b"a")]})
    assert store.read_log("s", 0, 0) == store_base.LogRead([(1, b"a")], "open")
    assert store.read_log("s", 1, 0.05) == store_base.LogRead([], "open")
    store.append_many({"s": [(2, b"b")]}, closing=("s",), ttl=60)
    assert store.read_log("s", 1, 5) == store_base.LogRead([(2, b"b")], "closed")
    assert store.read_log("s", 2, 5) == store_base.LogRead([], "closed")  # at once: nothing more will come


def test_only_the_producer_holding_the_lease_writes_a_log(store):
    # A stalled producer's stream is adopted elsewhere; when it wakes it must not write.
    store.open_log("s", ttl=60, lease="first")
    assert store.append_many({"s": [(1, b"a")]}, leases={"s": "first"}) == set()
    assert store.take_over("s", "second") and not store.take_over("gone", "second")
    assert time.time() - store.seen_at("s", "producer") < 5  # the adopter counts as alive at once
    assert store.append_many({"s": [(2, b"old")]}, closing=("s",), ttl=60, leases={"s": "first"}) == {"s"}
    assert store.read_log("s", 0, 0) == store_base.LogRead([(1, b"a")], "open")
    assert store.append_many({"s": [(2, b"new")]}, leases={"s": "second"}) == set()
    assert store.append_many({"s": [(2, b"new"), (3, b"end")]}, closing=("s",), ttl=60,
                             leases={"s": "second"}) == set()  # a batch written again: no duplicate
    assert store.read_log("s", 0, 0) == store_base.LogRead([(1, b"a"), (2, b"new"), (3, b"end")], "closed")


def test_stop_flags_and_liveness(store):
    store.open_log("s", ttl=60)
    store.open_log("u", ttl=60)
    assert not store.stop_requested("s") and store.stopped_among(["s", "u"]) == set()
    store.request_stop("s")
    assert store.stop_requested("s") and store.stopped_among(["s", "u"]) == {"s"}
    store.touch("s", "reader")
    store.touch_many(["s", "u"], "producer")
    assert time.time() - store.seen_at("s", "reader") < 5
    assert time.time() - store.seen_at("u", "producer") < 5 and store.seen_at("u", "reader") is None


def test_counters_count_per_window(store):
    assert [store.hit("k", 60)[0] for _ in range(3)] == [1, 2, 3]
    assert 0 < store.hit("k", 60)[1] <= 60
    assert store.hit("other", 60)[0] == 1


def test_slots_cap_release_expire_and_refresh(store):
    assert store.acquire("c", "s1", 2, 60) and store.acquire("c", "s2", 2, 60)
    assert not store.acquire("c", "s3", 2, 60)
    store.release("c", "s1")
    assert store.acquire("c", "s3", 2, 60)
    assert store.acquire("d", "dead", 1, 0.05) and not store.acquire("d", "live", 1, 60)
    time.sleep(0.1)  # a slot its process stopped refreshing frees itself
    assert store.acquire("d", "live", 1, 0.2)
    store.refresh([("d", "live")], 60)
    time.sleep(0.3)
    assert not store.acquire("d", "other", 1, 60)


def test_conversations_keep_order_owner_and_size(store):
    assert store.conversation("c") is None and store.messages("c") == []
    first = store.append_messages("c", [{"role": "user", "content": "q1"}, {"role": "user", "content": "漢字"}], 60,
                                  owner="ann")
    assert first.owner == "ann" and first.messages == 2
    info = store.append_message("c", {"role": "assistant", "content": "a"}, 60, owner="bob")
    assert info.owner == "ann" and info.messages == 3  # the creator stays the owner
    assert info.bytes == sum(len(store_base.to_json(m).encode()) for m in store.messages("c"))
    assert store.conversation("c") == info
    assert [m["content"] for m in store.messages("c")] == ["q1", "漢字", "a"]
    assert [m["content"] for m in store.messages("c", 1)] == ["漢字", "a"]
    assert [m["content"] for m in store.messages("c", 0, 2)] == ["q1", "漢字"]
    assert store.messages("c", 2, 2) == [] and store.messages("c", 5) == []
    assert store.delete_conversation("c") and store.messages("c") == [] and store.conversation("c") is None
    assert not store.delete_conversation("c")


def test_a_new_conversation_starts_with_its_ticket_in_one_step(store):
    records = [{"role": "user", "content": "q1"}, {"role": "user", "content": "漢字"}]
    info = store.start_conversation("c", records, 60, "ann", ("t", {"position": 2}, 60))
    assert info == store_base.ConversationInfo("ann", 2, sum(len(store_base.to_json(r).encode()) for r in records))
    assert store.conversation("c") == info and [m["content"] for m in store.messages("c")] == ["q1", "漢字"]
    assert store.take_ticket("t") == {"position": 2}
    after = store.append_message("c", {"role": "assistant", "content": "a"}, 60, owner="bob")
    assert after.owner == "ann" and after.messages == 3  # a conversation like any other from then on
    assert store.start_conversation("d", records[:1], 60, "bob").messages == 1  # no ticket
    assert not store.ticket_exists("t") and store.conversation("d").owner == "bob"


def test_a_post_sse_answer_is_kept_with_its_streams_end_in_one_step(store):
    store.start_conversation("c", [{"role": "user", "content": "q"}], 60, "ann")
    for member in ("s1", "s2"):
        assert store.acquire("streams:ann", member, 2, 60)
        store.put_ticket(f"adopt:{member}", {"owner": "ann"}, 60)
    info = store.append_message_releasing("c", {"role": "assistant", "content": "a"}, 60, "ann",
                                          ("streams:ann", "s1"), "adopt:s1")
    assert info.messages == 2 and [m["content"] for m in store.messages("c")] == ["q", "a"]
    assert not store.ticket_exists("adopt:s1") and store.ticket_exists("adopt:s2")
    assert store.acquire("streams:ann", "s3", 2, 60)  # s1's slot was given back, s2's kept
    assert not store.acquire("streams:ann", "s4", 2, 60)
    # A deleted conversation refuses the answer; the stream still ends. No slot: the record alone.
    assert store.delete_conversation("c")
    assert store.append_message_releasing("c", {"role": "assistant", "content": "b"}, 60, "ann", None,
                                          "adopt:s2") is None
    assert not store.ticket_exists("adopt:s2") and store.messages("c") == []


def test_where_the_end_of_a_stream_is_a_write_of_its_own_its_failure_does_not_undo_the_answer():
    """The stores without one write for both (Redis, memory) append, then give the slot back:
    the answer is kept, so a failure of the second step is logged, not raised (the reader would
    be told the answer could not be saved, and retry it); the slot and record expire by their
    TTL. Found in review."""
    class FailingRelease(MemoryStore):
        def release_dropping(self, key: str, member: str, ticket_id: str) -> None:
            raise StoreError("Redis went away")

    store = FailingRelease()
    store.start_conversation("c", [{"role": "user", "content": "q"}], 60, "ann")
    info = store.append_message_releasing("c", {"role": "assistant", "content": "a"}, 60, "ann",
                                          ("streams:ann", "s1"), "adopt:s1")
    assert info is not None and [m["content"] for m in store.messages("c")] == ["q", "a"]


def test_a_deleted_conversation_stays_deleted(store):
    # An answer still running when its conversation is deleted must not bring it back.
    store.append_message("c", {"role": "user", "content": "secret"}, 60, owner="ann")
    assert store.delete_conversation("c")
    assert store.append_message("c", {"role": "assistant", "content": "answer"}, 60, owner="ann") is None
    assert store.conversation("c") is None and store.messages("c") == [] and not store.delete_conversation("c")
    store.append_message("brief", {"role": "user", "content": "q"}, 0.05, owner="ann")
    assert store.delete_conversation("brief")
    time.sleep(0.1)  # the tombstone lasts as long as the conversation would have
    assert store.append_message("brief", {"role": "user", "content": "new"}, 60, owner="bob").messages == 1


def test_conversations_expire_after_their_last_message(store):
    store.append_message("old", {"role": "user", "content": "q"}, 0.05, owner="ann")
    time.sleep(0.1)
    assert store.conversation("old") is None and store.messages("old") == []
    store.append_message("kept", {"role": "user", "content": "q"}, 0.2, owner="ann")
    store.append_message("kept", {"role": "assistant", "content": "a"}, 60, owner="ann")  # its TTL starts again
    time.sleep(0.3)
    assert store.conversation("kept").messages == 2 and len(store.messages("kept")) == 2
    again = store.append_message("old", {"role": "user", "content": "new"}, 60, owner="bob")
    assert again.owner == "bob" and again.messages == 1  # an expired id starts over


def test_expired_rows_are_swept_on_later_writes(store, monkeypatch):
    if isinstance(store, MemoryStore):
        monkeypatch.setattr(store_base, "SWEEP_SECONDS", 0.0)
    else:
        monkeypatch.setattr(sqlite_store, "SWEEP_SECONDS", 0.0)  # Redis expires keys by itself
    store.put_ticket("t", {"a": 1}, 0.05)
    store.open_log("s", 0.05)
    store.append_frames("s", [(1, b"x")])
    store.append_message("c", {"role": "user", "content": "q"}, 0.05)
    time.sleep(0.1)
    store.append_message("other", {"role": "user", "content": "q"}, 60)  # any write sweeps
    time.sleep(0.05)
    assert store.take_ticket("t") is None and store.log_state("s") is None and store.read_frames("s", 0, 0) == []
    assert store.conversation("c") is None
    if isinstance(store, MemoryStore):
        assert "t" not in store._tickets and "s" not in store._logs and "c" not in store._conversations
    elif hasattr(store, "_query"):
        counts = [store._query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("tickets", "frames", "streams")]
        assert counts == [0, 0, 0]
        assert store._query("SELECT COUNT(*) FROM messages WHERE conversation_id = 'c'")[0][0] == 0


def test_concurrent_writers_are_each_applied_exactly_once(store):
    # Hundreds of mod_wsgi threads write at once: none is lost or counted twice, a cap holds.
    import threading

    granted: list[bool] = []
    start = threading.Barrier(40)

    def writer(n: int) -> None:
        start.wait()
        for i in range(10):
            store.hit("busy", 60)
            store.append_message("shared", {"role": "user", "content": f"{n}-{i}"}, 60, owner="ann")
        granted.append(store.acquire("cap", f"s{n}", 10, 60))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert store.hit("busy", 60)[0] == 401
    assert store.conversation("shared").messages == 400
    assert sorted(m["content"] for m in store.messages("shared")) == sorted(f"{n}-{i}" for n in range(40)
                                                                           for i in range(10))
    assert granted.count(True) == 10 and len(granted) == 40



def test_as_many_readers_wait_at_once_as_a_process_has_threads(store):
    # A mod_wsgi stream process runs 250 threads (300 in the bench), and each reader of a
    # log waits in read_frames: none may fail for want of a store connection.
    import threading

    store.open_log("busy", ttl=60)
    readers = 300
    got: list[list] = []
    errors: list[BaseException] = []
    waiting = threading.Barrier(readers + 1)

    def reader() -> None:
        waiting.wait()
        try:
            got.append(store.read_frames("busy", 0, 10))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for thread in threads:
        thread.start()
    waiting.wait()
    time.sleep(0.5)  # every reader is in its wait
    store.append_frames("busy", [(1, b"token")])
    for thread in threads:
        thread.join(30)
    assert errors == [] and got == [[(1, b"token")]] * readers


def test_sqlite_connections_do_not_grow_with_the_threads_that_use_the_store(tmp_path):
    """A mod_wsgi daemon keeps hundreds of request threads alive. A SQLite connection holds
    about 160 kB (its lookaside, schema and statement caches), so one per thread that ever
    touched the store cost ~160 kB per stream thread under Apache. Counted here by the
    descriptors open on the database file while 60 live threads have used the store."""
    import threading

    path = tmp_path / "threads.sqlite3"
    store = open_store(f"sqlite:///{path}", str(tmp_path))
    threads_count = 60
    used = threading.Barrier(threads_count + 1)
    finish = threading.Event()

    def user(n: int) -> None:
        store.append_message(f"c{n}", {"role": "user", "content": "hi"}, 60, owner="o")
        assert store.messages(f"c{n}") == [{"role": "user", "content": "hi"}]
        store.open_log(f"s{n}", ttl=60)
        assert store.log_state(f"s{n}") == "open"
        used.wait()
        finish.wait(30)  # alive, as a mod_wsgi thread between requests

    def open_on_database() -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(1 for fd in fds if _points_to(f"/proc/self/fd/{fd}", str(path)))

    threads = [threading.Thread(target=user, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    try:
        used.wait(30)
        assert open_on_database() <= sqlite_store.IDLE_READERS + 1
    finally:
        finish.set()
        for thread in threads:
            thread.join(30)
        store.close()
    assert open_on_database() == 0


def _points_to(link: str, target: str) -> bool:
    try:
        return os.readlink(link) == target
    except OSError:
        return False


def test_a_redis_that_cannot_answer_is_a_store_error_like_sqlites(redis_server):
    """Issue 21: errors are mapped at their boundary. A Redis that went away fails every call
    as `StoreError` (a 503 for the caller), never as redis-py's own exception."""
    from app.store import StoreError

    store = open_store(redis_server.url, "")
    redis_server.stop()
    try:
        for call in (lambda: store.put_ticket("t", {}, 60), lambda: store.read_frames("s", 0, 0),
                     lambda: store.hit("k", 60), lambda: store.append_message("c", {"role": "user"}, 60)):
            with pytest.raises(StoreError):
                call()
    finally:
        redis_server.start()
        store.close()


GEVENT_WRITERS = r"""
from gevent import monkey; monkey.patch_all()
import sys, time
import gevent
from app.store.sqlite import SqliteStore

store = SqliteStore(sys.argv[1])
failures = []

def writer(n):
    for i in range(60):
        try:
            store.refresh([(f"k{n}", f"m{i}"), (f"k{n}", f"m{i}x")], 60)
            store.append_many({f"s{n}": [(i, b"frame")]}, (f"s{n}",) if i == 59 else (), 60)
            store.append_messages(f"c{n}", [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], 60)
        except Exception as exc:
            failures.append(repr(exc))

gevent.joinall([gevent.spawn(writer, n) for n in range(40)])
print(len(failures), sorted(set(failures))[:3])
"""


def test_sqlite_writes_from_gevents_native_threads_never_fail(tmp_path):
    """Under gunicorn's gevent worker every SQLite call ran on gevent's native thread pool
    (a contended write still does): there, `executemany` on the write connection failed now
    and then with SQLITE_MISUSE ("bad parameter or other API misuse"), 1-3 streams of a few
    thousand in the bench, each ending with an error event. The same rows written one
    `execute` at a time never fail."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GEVENT_WRITERS, str(tmp_path / "relay.sqlite3")],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("0 "), done.stdout


GEVENT_LOCKED_ELSEWHERE = r"""
from gevent import monkey; monkey.patch_all()
import sqlite3, sys, time
import gevent
from app.store.sqlite import SqliteStore

path = sys.argv[1]
store = SqliteStore(path)
store.open_log("s", ttl=60)
other = sqlite3.connect(path, isolation_level=None)  # another process's write, held 1 s
other.execute("BEGIN IMMEDIATE")
ticks = []

def ticker():
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

def release():
    gevent.sleep(1.0)
    other.execute("COMMIT")

started = time.monotonic()
gevent.joinall([gevent.spawn(ticker), gevent.spawn(release),
                gevent.spawn(store.append_many, {"s": [(1, b"a")]})])
gaps = [b - a for a, b in zip(ticks, ticks[1:])]
print(len(store.read_frames("s", 0, 0)), round(max(gaps), 3))
"""


def test_under_gevent_a_write_waiting_for_another_process_lets_the_loop_run(tmp_path):
    """SQLite calls of the gevent worker run on its event loop; a write that waits for another
    process's lock must wait cooperatively: the other greenlets (streams) keep running."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GEVENT_LOCKED_ELSEWHERE, str(tmp_path / "relay.sqlite3")],
                          capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    written, longest_gap = done.stdout.split()
    assert written == "1"  # written once the other process let go
    assert float(longest_gap) < 0.5, done.stdout  # the loop was never held for the second


GEVENT_WAL = r"""
from gevent import monkey; monkey.patch_all()
import os, sys
import gevent
from app.store.sqlite import SqliteStore

path = sys.argv[1]
store = SqliteStore(path)
for n in range(80):
    store.open_log(f"s{n}", ttl=60)
    store.append_many({f"s{n}": [(i, os.urandom(1000)) for i in range(100)]})
    gevent.sleep(0.05)
print(os.path.getsize(path + "-wal"))
"""


def test_under_gevent_the_wal_is_checkpointed_off_the_loop(tmp_path):
    """The loop's own commits never checkpoint (a checkpoint syncs the disk); one runs on a
    native thread at most every CHECKPOINT_SECONDS, so the WAL is reused, not grown: 8 MB
    written over 4 s leave a WAL well under 8 MB."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GEVENT_WAL, str(tmp_path / "relay.sqlite3")],
                          capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) < 6 * 2**20, done.stdout


GEVENT_KILLED_WRITER = r"""
from gevent import monkey; monkey.patch_all()
import sqlite3, sys
import gevent
from gevent.monkey import get_original
from app.store.sqlite import SqliteStore

path = sys.argv[1]
store = SqliteStore(path)
native_sleep = get_original("time", "sleep")

# Another process holds SQLite's write lock for 0.3 s: greenlet A's write goes to a native thread.
other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
other.execute("BEGIN IMMEDIATE")
get_original("_thread", "start_new_thread")(lambda: (native_sleep(0.3), other.execute("COMMIT")), ())

def slow_work(db):  # A's transaction stays open on the write connection for 1 s
    db.execute("INSERT INTO tickets VALUES ('a', '{}', 1e12)")
    native_sleep(1.0)

a = gevent.spawn(store._write, slow_work)
gevent.sleep(0.1)
a.kill()  # gunicorn ending a worker's handlers after graceful_timeout
gevent.sleep(0.4)  # A's native thread is inside its transaction now
try:
    store.put_ticket("b", {}, 60)  # must wait for A's transaction to end, then succeed
    print("OK", store.ticket_exists("a"), store.ticket_exists("b"))
except Exception as exc:
    print("FAILED", type(exc).__name__, exc)
"""


def test_under_gevent_a_writer_killed_while_its_write_waits_keeps_the_connection_until_it_ends(tmp_path):
    """A write that waits for another process runs on a native thread while its greenlet waits:
    a greenlet killed meanwhile must not hand the write connection (and the process's write
    lock) to the next writer while that thread's transaction is still open. Found in review."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GEVENT_KILLED_WRITER, str(tmp_path / "relay.sqlite3")],
                          capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OK", "True", "True"], done.stdout + done.stderr[-2000:]
