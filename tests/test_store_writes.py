"""How many store write transactions one stream costs (SQLite store): each one is a commit
on a file every worker shares, so their number is what a burst of new streams queues behind.
The counts are ceilings: a change that adds a write must raise one here, and say why.

Not counted: the log flusher's batches and the slot keeper's refreshes, which serve every
stream of the process at once (their own threads)."""

import sys
import threading

import pytest

from app.routes import EXTENSION
from app.store.sqlite import SqliteStore
from tests.conftest import wait_until
from tests.fake_upstream import BODIES, Reply

SHARED = ("relay-log-flusher", "relay-slot-keeper")


@pytest.fixture
def writes(monkeypatch):
    """Each write transaction of a stream, as "app function -> store method"."""
    made: list[str] = []
    write = SqliteStore._write

    def counted(self, work):
        if threading.current_thread().name not in SHARED:
            method, caller = sys._getframe(1), sys._getframe(2)
            made.append(f"{caller.f_code.co_name} -> {method.f_code.co_name}")
        return write(self, work)

    monkeypatch.setattr(SqliteStore, "_write", counted)
    return made


@pytest.fixture
def sqlite_client(upstream, make_app, tmp_path):
    upstream.reset(Reply(chunks=BODIES["openai"](["one ", "two"])))
    return make_app(STORE_URL=f"sqlite:///{tmp_path}/relay.sqlite3").test_client()


def settled(client) -> None:
    """Wait for what a stream writes after its reader has all of it."""
    relay = client.application.extensions[EXTENSION].relay
    wait_until(lambda: not relay.generations and not relay.flusher.active, what="the stream to be put away")


def test_a_post_sse_stream_writes_the_store_this_many_times(sqlite_client, writes):
    ticket = sqlite_client.post("/api/chat/streams", json={"provider": "openai", "prompt": "hi"}).get_json()
    body = sqlite_client.get(ticket["stream_url"]).get_data(as_text=True)
    assert '"two"' in body and "event: done" in body, body
    settled(sqlite_client)
    # Step 1: the caller's ticket slot, the quota, the user's message, the ticket. Step 2: the
    # reader's slot, the ticket taken, the stream slot, the ticket slot given back, the adoption
    # record, the log opened; at the end the answer, the quota, the stream slot given back,
    # the adoption record removed, the reader's slot given back.
    assert len(writes) <= 15, writes


def test_a_direct_stream_writes_the_store_this_many_times(sqlite_client, writes):
    body = sqlite_client.post("/api/chat/stream", json={"provider": "openai", "prompt": "hi"}).get_data(as_text=True)
    assert '"two"' in body and "event: done" in body, body
    settled(sqlite_client)
    # The stream slot, the quota, the user's message; at the end the answer, the quota, the slot.
    assert len(writes) <= 6, writes
