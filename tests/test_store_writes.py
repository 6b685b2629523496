"""How many store write transactions one stream costs (SQLite store): each one is a commit
on a file every worker shares, so their number is what a burst of new streams queues behind.
The counts are ceilings: a change that adds a write must raise one here, and say why.

Not counted: the log flusher's batches and the slot keeper's refreshes, which serve every
stream of the process at once (their own threads)."""

import sys
import threading

import pytest

from app.routes import EXTENSION
from app.service import ADOPT
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
    # Step 1: the caller's ticket slot, the quota, the user's message with the ticket (one write:
    # a new conversation). Step 2: the reader's slot, the ticket taken and kept as the adoption
    # record (one write), the stream slot, the ticket slot given back, the log opened; at the end
    # the answer with the stream slot given back and the adoption record removed (one write),
    # the quota, the reader's slot.
    assert len(writes) <= 11, writes


def test_a_direct_stream_writes_the_store_this_many_times(sqlite_client, writes):
    body = sqlite_client.post("/api/chat/stream", json={"provider": "openai", "prompt": "hi"}).get_data(as_text=True)
    assert '"two"' in body and "event: done" in body, body
    settled(sqlite_client)
    # The stream slot, the quota, the user's message; at the end the answer, the quota, the slot.
    assert len(writes) <= 6, writes


def test_the_adoption_record_lives_exactly_while_the_answer_runs(upstream, make_app, tmp_path):
    """Taken with the ticket and removed with the stream slot: a refused opening puts the
    ticket back and keeps no record, a finished stream keeps neither record nor slot."""
    upstream.reset(Reply(chunks=BODIES["openai"](["one"])))
    app = make_app(STORE_URL=f"sqlite:///{tmp_path}/relay.sqlite3", API_TOKENS="alpha,beta")
    client, store = app.test_client(), app.extensions[EXTENSION].store
    alpha, beta = {"Authorization": "Bearer alpha"}, {"Authorization": "Bearer beta"}
    ticket = client.post("/api/chat/streams", json={"provider": "openai", "prompt": "hi"}, headers=alpha).get_json()
    assert client.get(ticket["stream_url"], headers=beta).status_code == 403  # not the creator
    assert store.ticket_exists(ticket["id"]) and not store.ticket_exists(ADOPT + ticket["id"])
    assert '"one"' in client.get(ticket["stream_url"], headers=alpha).get_data(as_text=True)
    settled(client)
    assert not store.ticket_exists(ticket["id"]) and not store.ticket_exists(ADOPT + ticket["id"])
    assert store.acquire("streams:alpha", "another", 1, 60)  # the stream's slot was given back


@pytest.mark.parametrize("stream, most", [("post-sse", 4), ("direct", 2)])
def test_with_no_caps_and_no_quota_as_the_bench_runs(upstream, make_app, tmp_path, writes, stream, most):
    upstream.reset(Reply(chunks=BODIES["openai"](["one ", "two"])))
    client = make_app(STORE_URL=f"sqlite:///{tmp_path}/relay.sqlite3", MAX_STREAMS_PER_CLIENT=0,
                      MAX_TICKETS_PER_CLIENT=0, MAX_READERS_PER_CLIENT=0, STORAGE_QUOTA_BYTES=0).test_client()
    body = {"provider": "openai", "prompt": "hi"}
    if stream == "direct":
        text = client.post("/api/chat/stream", json=body).get_data(as_text=True)
    else:
        text = client.get(client.post("/api/chat/streams", json=body).get_json()["stream_url"]).get_data(as_text=True)
    assert '"two"' in text and "event: done" in text, text
    settled(client)
    # POST-SSE: the user's message with the ticket, the ticket taken and kept as the adoption
    # record, the log opened, the answer with the record removed. Direct: the two messages.
    assert len(writes) <= most, writes
