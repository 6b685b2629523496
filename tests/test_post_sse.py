"""POST-SSE: stored payloads, resume with Last-Event-ID, 204 when done, stop, stores."""

import threading
import time

import pytest
import requests

from app.protocols import RelayEvents
from app.relay import LogFlusher
from tests.conftest import open_stream, text_of, wait_until
from tests.fake_upstream import BODIES, Reply

PIECES = [f"p{i} " for i in range(30)]


def create(url, body):
    response = requests.post(f"{url}/api/chat/streams", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def test_post_then_stream(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES)))
    url = live()
    ticket = create(url, {"provider": "openai", "prompt": "x" * 20_000})  # no cookie or URL size limit
    assert len(ticket["id"]) >= 22 and ticket["stream_url"] == f"/api/chat/streams/{ticket['id']}"
    events = open_stream(url + ticket["stream_url"]).read_all()
    assert text_of(events) == "".join(PIECES) and events[0].data["id"] == ticket["id"]
    assert len(upstream.last().body["messages"][0]["content"]) == 20_000


def test_bad_payload_is_refused_at_step_one(live):
    response = requests.post(f"{live()}/api/chat/streams", json={"prompt": ""}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request"


def test_unknown_and_malformed_ids_are_404(live):
    url = live()
    for stream_id in ("A" * 22, "bad!id", "x" * 100):
        response = requests.get(f"{url}/api/chat/streams/{stream_id}", timeout=10)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize("store_url", ["memory://", "sqlite"])
def test_resume_with_last_event_id_gets_the_rest_once(store_url, upstream, live, tmp_path):
    if store_url == "sqlite":
        store_url = f"sqlite:///{tmp_path}/relay.sqlite3"
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES), delay=0.03))
    url = live(STORE_URL=store_url, STREAM_GRACE_SECONDS=5)
    ticket = create(url, {"provider": "openai", "prompt": "hi"})
    first = open_stream(url + ticket["stream_url"])
    got = first.take(6)
    first.close()
    rest = open_stream(url + ticket["stream_url"], headers={"Last-Event-ID": got[-1].id}).read_all()
    events = got + rest
    ids = [int(e.id) for e in events]
    assert ids == list(range(1, len(ids) + 1))  # none twice, none missing
    assert text_of(events) == "".join(PIECES) and events[-1].event == "done"
    assert len(upstream.seen) == 1  # the model was called once
    # the reader has everything: 204, so EventSource stops reconnecting
    done = requests.get(url + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id}, timeout=10)
    assert done.status_code == 204


def test_a_second_app_on_the_same_sqlite_file_resumes_from_the_store(upstream, make_app, serve, tmp_path):
    """Two processes' worth of apps sharing one SQLite file: read the rest from the other."""
    store_url = f"sqlite:///{tmp_path}/shared.sqlite3"
    one, two = serve(make_app(STORE_URL=store_url)), serve(make_app(STORE_URL=store_url))
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES), delay=0.03))
    ticket = create(one, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(one + ticket["stream_url"])
    got = reader.take(4)
    reader.close()
    rest = open_stream(two + ticket["stream_url"], headers={"Last-Event-ID": got[-1].id}).read_all()
    assert text_of(got + rest) == "".join(PIECES)
    assert [int(e.id) for e in got + rest] == list(range(1, len(got + rest) + 1))
    assert len(upstream.seen) == 1


@pytest.mark.parametrize("shared", ["sqlite", "redis"])
def test_a_reconnect_right_after_done_on_another_process_gets_204(shared, upstream, make_app, serve, tmp_path,
                                                                   monkeypatch, request):
    """The reader got `done` from the producer's process, which has not written it (and
    "closed") to the store yet; it reconnects at once, elsewhere: 204, not an empty 200."""
    if shared == "redis":
        server = request.getfixturevalue("redis_server")
        server.flush()
        store_url = server.url
    else:
        store_url = f"sqlite:///{tmp_path}/shared.sqlite3"
    monkeypatch.setattr(LogFlusher, "FLUSH_SECONDS", 2.0)  # the producer's store writes lag behind its reader
    one = serve(make_app(STORE_URL=store_url, SSE_HEARTBEAT_SECONDS=10))
    two = serve(make_app(STORE_URL=store_url, SSE_HEARTBEAT_SECONDS=10))
    upstream.reset(Reply(chunks=BODIES["openai"](["a ", "b."])))
    ticket = create(one, {"provider": "openai", "prompt": "hi"})
    events = open_stream(one + ticket["stream_url"]).read_all()
    assert events[-1].event == "done"
    again = requests.get(two + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id}, timeout=30)
    assert again.status_code == 204, again.text


def test_a_stalled_producer_whose_stream_was_adopted_writes_no_more(upstream, make_app, serve, tmp_path):
    """A store stall over 5 s lets a reader elsewhere adopt a live stream. When the first
    producer's writes go through again, the store refuses them and it stops: one producer
    per log, never two answers interleaved in it."""
    store_url = f"sqlite:///{tmp_path}/shared.sqlite3"
    app_one = make_app(STORE_URL=store_url, STREAM_GRACE_SECONDS=30)
    one, two = serve(app_one), serve(make_app(STORE_URL=store_url, STREAM_GRACE_SECONDS=30))
    pieces = [f"s{i} " for i in range(400)]
    upstream.reset(Reply(chunks=BODIES["openai"](pieces), delay=0.05), Reply(chunks=BODIES["openai"](["THE END."])))
    ticket = create(one, {"provider": "openai", "prompt": "hi"})
    stream_id = ticket["id"]
    first = open_stream(one + ticket["stream_url"])
    events = first.take(4)
    first.close()
    store_one = app_one.extensions["llm_sse_relay"].store
    wait_until(lambda: len(store_one.read_frames(stream_id, 0, 0)) >= len(events))  # (what this reader saw)
    stalled, resume = threading.Event(), threading.Event()
    append_many = store_one.append_many

    def stalling(*args, **kwargs):  # the producer's store writes hang (a disk, a network partition)
        stalled.set()
        resume.wait(30)
        return append_many(*args, **kwargs)

    store_one.append_many = stalling
    try:
        assert stalled.wait(5)
        # ...for longer than readers wait for a producer: it looks dead
        store_one._write(lambda db: db.execute("UPDATE streams SET producer_seen = ? WHERE id = ?",
                                               (time.time() - 60, stream_id)))
        remote = open_stream(two + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id})
        assert "resumed" in remote.until("meta").data  # the second process produces it now
    finally:
        resume.set()
    events += remote.read_all()
    assert events[-1].event == "done" and text_of(events).endswith("THE END.")
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    first_call = upstream.seen[0]
    assert first_call.closed.wait(30) and len(first_call.sent) < len(pieces) + 2  # the stalled producer stopped
    wait_until(lambda: store_one.log_state(stream_id) == "closed")  # by the adopter, a flush after its reader's end
    stored = store_one.read_log(stream_id, 0, 0)
    assert len(stored.frames) == len(events)
    assert RelayEvents.text_of([frame for _, frame in stored.frames]) == text_of(events)  # the adopter's, only
    relay_one = app_one.extensions["llm_sse_relay"].relay
    wait_until(lambda: len(upstream.seen) == 2 and stream_id not in relay_one.generations)


def test_delete_stops_the_generation_from_another_app(upstream, make_app, serve, tmp_path):
    store_url = f"sqlite:///{tmp_path}/shared.sqlite3"
    one, two = serve(make_app(STORE_URL=store_url)), serve(make_app(STORE_URL=store_url))
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(500)]), delay=0.02))
    ticket = create(one, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(one + ticket["stream_url"])
    events = []
    collector = threading.Thread(target=lambda: events.extend(reader.read_all()))
    collector.start()
    seen = upstream.wait_for_request()
    time.sleep(0.2)
    stopped_at = time.monotonic()
    assert requests.delete(two + ticket["stream_url"], timeout=10).json()["status"] == "stopped"
    assert seen.closed.wait(3)
    assert seen.closed_at - stopped_at < 1.0  # "within a second"
    collector.join(5)
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "stopped"


def test_grace_period_keeps_generating_then_stops(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(1000)]), delay=0.01))
    url = live(STREAM_GRACE_SECONDS=1)
    ticket = create(url, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(url + ticket["stream_url"])
    next(iter(reader))
    left = time.monotonic()
    reader.close()
    seen = upstream.wait_for_request()
    assert not seen.closed.wait(0.6)  # still generating for a reload to pick up
    assert seen.closed.wait(4)
    assert 1.0 <= seen.closed_at - left < 4


def test_grace_zero_stops_at_once(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(1000)]), delay=0.01))
    url = live(STREAM_GRACE_SECONDS=0, SSE_HEARTBEAT_SECONDS=0.5)
    ticket = create(url, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(url + ticket["stream_url"])
    next(iter(reader))
    reader.close()
    assert upstream.wait_for_request().closed.wait(2)


def test_delete_before_open_forgets_the_payload(live):
    url = live()
    ticket = create(url, {"prompt": "hi"})
    assert requests.delete(url + ticket["stream_url"], timeout=10).status_code == 200
    assert requests.get(url + ticket["stream_url"], timeout=10).status_code == 404
