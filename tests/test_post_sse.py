"""POST-SSE: stored payloads, resume with Last-Event-ID, 204 when done, stop, stores."""

import threading
import time

import pytest
import requests

from tests.conftest import open_stream, text_of
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
