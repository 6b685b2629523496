"""Many processes and hosts sharing a real redis-server: resume anywhere, stop anywhere,
a dead producer's answer is adopted and continued elsewhere, a restarted Redis ends a stream
with a clear error, never a hang."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import requests
from urllib3.exceptions import ProtocolError

from tests.conftest import free_port, open_stream, provider_env, text_of
from tests.fake_upstream import BODIES, Reply
from tests.servers import gunicorn

pytestmark = pytest.mark.redis
PIECES = [f"r{i} " for i in range(40)]


@pytest.fixture
def redis_url(redis_server):
    redis_server.flush()
    return redis_server.url


def create(url, body):
    response = requests.post(f"{url}/api/chat/streams", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def test_resume_on_another_app_gets_exactly_the_rest(redis_url, upstream, make_app, serve):
    one, two = serve(make_app(STORE_URL=redis_url)), serve(make_app(STORE_URL=redis_url))
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES), delay=0.02))
    ticket = create(one, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(one + ticket["stream_url"])
    got = reader.take(7)
    reader.close()
    rest = open_stream(two + ticket["stream_url"], headers={"Last-Event-ID": got[-1].id}).read_all()
    events = got + rest
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == "".join(PIECES) and events[-1].event == "done"
    assert len(upstream.seen) == 1
    assert requests.get(two + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id},
                        timeout=10).status_code == 204


@pytest.fixture
def two_processes(redis_url, fake_upstream):
    env = {**provider_env(fake_upstream.url), "STORE_URL": redis_url, "SSE_HEARTBEAT_SECONDS": "0.5",
           "STREAM_GRACE_SECONDS": "30"}
    servers = [gunicorn(free_port(), env), gunicorn(free_port(), env)]
    yield servers
    for server in servers:
        server.stop()


def test_reader_process_killed_mid_stream_resumes_elsewhere_intact(two_processes, upstream):
    producer, middle = two_processes
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES), delay=0.05))
    ticket = create(producer.url, {"provider": "openai", "prompt": "hi"})
    first = open_stream(producer.url + ticket["stream_url"])
    events = first.take(4)
    first.close()  # the producer keeps going through the grace period
    second = open_stream(middle.url + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id})
    events += second.take(6)
    middle.proc.send_signal(signal.SIGKILL)  # the process serving this reader dies
    try:
        for event in second:
            events.append(event)
    except (requests.RequestException, ProtocolError, OSError):
        pass  # the connection died with its process
    rest = open_stream(producer.url + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id}).read_all()
    events += rest
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == "".join(PIECES)
    assert len(upstream.seen) == 1


def test_a_dead_producers_answer_is_adopted_and_continued_elsewhere(two_processes, upstream):
    """The producer's process dies mid-answer (a restart, a crash): a reader on another process
    adopts the stream, and the answer continues from what was stored, no error, no gap."""
    producer, reader_host = two_processes
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES), delay=0.2), Reply(chunks=BODIES["openai"](["THE END."])))
    ticket = create(producer.url, {"provider": "openai", "prompt": "hi"})
    first = open_stream(producer.url + ticket["stream_url"])
    events = first.take(3)
    first.close()
    remote = open_stream(reader_host.url + ticket["stream_url"], headers={"Last-Event-ID": events[-1].id})
    remote.take(2)
    producer.proc.send_signal(signal.SIGKILL)
    started = time.monotonic()
    events += remote.read_all(timeout=30)  # every event this reader saw
    assert events[-1].event == "done" and time.monotonic() - started < 20
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))  # none lost, none twice
    resumed = [e.data["resumed"] for e in events if e.event == "meta" and "resumed" in e.data]
    text = text_of(events)
    assert len(resumed) == 1 and text.endswith("THE END.")
    before = text[:resumed[0]["after_chars"]]
    assert before and "".join(PIECES).startswith(before)  # the stored beginning, unchanged
    sent = upstream.last().body["messages"]
    assert sent[-2] == {"role": "assistant", "content": before}  # continued, not asked again
    assert len(upstream.seen) == 2


def test_stop_from_another_host(redis_url, upstream, make_app, serve):
    one, two = serve(make_app(STORE_URL=redis_url)), serve(make_app(STORE_URL=redis_url))
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(500)]), delay=0.02))
    ticket = create(one, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(one + ticket["stream_url"])
    events: list = []
    collector = threading.Thread(target=lambda: events.extend(reader.read_all()))
    collector.start()
    seen = upstream.wait_for_request()
    time.sleep(0.3)
    asked = time.monotonic()
    assert requests.delete(two + ticket["stream_url"], timeout=10).status_code == 200
    assert seen.closed.wait(3) and seen.closed_at - asked < 1.0
    collector.join(5)
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "stopped"


def test_redis_restart_during_a_stream_ends_it_with_an_error(redis_server, redis_url, upstream, make_app, serve):
    url = serve(make_app(STORE_URL=redis_url))
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(300)]), delay=0.02))
    ticket = create(url, {"provider": "openai", "prompt": "hi"})
    reader = open_stream(url + ticket["stream_url"])
    reader.take(3)
    redis_server.stop()
    try:
        time.sleep(1.0)
    finally:
        redis_server.start()
    events = reader.read_all(timeout=15)
    assert events[-1].event == "error" and events[-1].data["type"] == "store_unavailable"
    assert upstream.last().closed.wait(3)  # and nobody pays for the rest


def test_rate_limit_is_shared_across_apps_through_redis(redis_url, make_app, serve):
    one, two = (serve(make_app(STORE_URL=redis_url, RATE_LIMIT="3/minute")) for _ in range(2))
    body = {"prompt": "x", "model": "demo-fast"}
    codes = [requests.post(f"{url}/api/chat", json=body, timeout=10).status_code for url in (one, two, one)]
    assert codes == [200, 200, 200]
    limited = requests.post(f"{two}/api/chat", json=body, timeout=10)
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
