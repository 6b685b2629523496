"""Deploys that lose no answer: a gunicorn rolling restart under running POST-SSE streams."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from tests.conftest import free_port, provider_env
from tests.fake_upstream import BODIES, Reply
from tests.servers import gunicorn

PIECES = [f"t{i} " for i in range(40)]


def resumable_read(url: str, stream_url: str, log: dict) -> None:
    """What EventSource does: read; when the response ends without a last event, reconnect
    with Last-Event-ID; stop at done/error or a 204."""
    last, texts, reconnects = "0", [], 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            response = requests.get(url + stream_url, headers={"Last-Event-ID": last}, stream=True, timeout=30)
        except requests.RequestException:
            time.sleep(0.2)  # the old worker stopped accepting before the new one was ready
            reconnects += 1
            continue
        if response.status_code == 204:
            break
        ended = False
        buffer = b""
        try:
            for chunk in response.iter_content(None):
                buffer += chunk
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    fields = dict(line.split(": ", 1) for line in frame.decode().split("\n")
                                  if ": " in line and not line.startswith(":"))
                    if "id" in fields:
                        assert int(fields["id"]) == int(last) + 1, (last, fields)  # none lost, none twice
                        last = fields["id"]
                    if fields.get("event") == "token":
                        texts.append(__import__("json").loads(fields["data"])["text"])
                    if fields.get("event") in ("done", "error"):
                        ended = fields["event"]
        except requests.RequestException:
            pass
        if ended:
            log["end"] = ended
            break
        reconnects += 1
        time.sleep(0.05)
    log.update(text="".join(texts), reconnects=reconnects)


@pytest.mark.parametrize("streams", [50])
def test_rolling_restart_under_running_streams_loses_no_answer(streams, fake_upstream, upstream, tmp_path):
    upstream.reset(Reply(chunks=BODIES["openai"](PIECES), delay=0.1))  # about 4 s per answer
    server = gunicorn(free_port(), {**provider_env(fake_upstream.url), "WEB_CONCURRENCY": "2",
                                    "STORE_URL": f"sqlite:///{tmp_path}/relay.sqlite3", "SSE_HEARTBEAT_SECONDS": "1",
                                    "MAX_STREAMS_PER_CLIENT": "0", "MAX_TICKETS_PER_CLIENT": "0",
                                    "MAX_READERS_PER_CLIENT": "0",
                                    "STREAM_GRACE_SECONDS": "0", "DRAIN_SECONDS": "60"})
    try:
        tickets = [requests.post(f"{server.url}/api/chat/streams", json={"provider": "openai", "prompt": f"q{i}"},
                                 timeout=10).json() for i in range(streams)]
        logs: list[dict] = [{} for _ in tickets]
        readers = [threading.Thread(target=resumable_read, args=(server.url, t["stream_url"], log), daemon=True)
                   for t, log in zip(tickets, logs, strict=True)]
        for reader in readers:
            reader.start()
        upstream.wait_for_request(streams, timeout=20)
        time.sleep(1.0)  # every answer is under way
        server.proc.send_signal(signal.SIGHUP)  # gunicorn's rolling restart
        for reader in readers:
            reader.join(90)
        assert all(log.get("end") == "done" for log in logs), [log.get("end") for log in logs]
        assert all(log["text"] == "".join(PIECES) for log in logs)
        assert len(upstream.seen) == streams  # one upstream call each: nothing generated twice
        assert sum(log["reconnects"] for log in logs) >= streams // 2  # readers really moved to new workers
        assert "draining:" in server.output()
    finally:
        server.stop()


def test_a_draining_worker_stops_an_answer_whose_reader_never_comes_back():
    """Finding (issue 20): on a drain the readers of resumable answers are sent to resume on
    another worker, and the answers were then never checked for absence: one whose reader
    never came back ran to its end (up to DRAIN_SECONDS) with nobody to read it. Now a reader
    that resumes elsewhere keeps it going (the store says someone reads), and without one
    the answer stops like any answer whose reader left."""
    from types import SimpleNamespace

    from app.config import Settings
    from app.relay import Relay
    from app.store import MemoryStore
    from tests.test_relay import Counting, driver

    settings = Settings(STREAM_LOG_TTL=60, STREAM_GRACE_SECONDS=0.5, TOOL_MAX_ROUNDS=2, SSE_HEARTBEAT_SECONDS=15)
    relay = Relay(settings, MemoryStore())
    provider = Counting(100_000, pause=0.01)  # about 17 minutes of answer
    task = SimpleNamespace(model="m", messages=[])
    generation = relay.start(provider, task, "conv", stream_id="d" * 22, owner="me", resumable=True, driven=True)
    body = driver(generation)
    next(body), next(body), next(body)  # retry, msgid, a token
    assert relay.detach_readers() == 1  # the worker is stopping
    list(body)  # the response ends without a last event: EventSource reconnects elsewhere
    body.close()

    resumed_until = time.monotonic() + 3  # a reader elsewhere, for a while
    while time.monotonic() < resumed_until:
        relay.store.touch(generation.id, "reader")  # what a reader in another process does
        assert not generation.cancel.is_set(), "stopped while a reader was still reading elsewhere"
        time.sleep(0.2)
    deadline = time.monotonic() + 30  # then it leaves too: the answer must stop
    while not generation.finished and time.monotonic() < deadline:
        time.sleep(0.1)
    assert generation.finished and generation.answer.outcome == "abandoned", generation.answer.outcome
    assert provider.produced < 100_000


def test_each_gunicorn_has_its_own_control_socket_or_none(tmp_path, fake_upstream):
    """Finding (issue 20): gunicorn (25.1 and later) opens a control socket at one path per
    user, ~/.gunicorn/gunicorn.ctl, removing whatever is there: a second relay (or any other
    gunicorn app of the user) took the first one's socket away, and stopping either removed
    the other's. gunicorn.conf.py opens none unless CONTROL_SOCKET names a path of its own."""
    home = tmp_path / "home"
    shared = home / ".gunicorn" / "gunicorn.ctl"
    shared.parent.mkdir(parents=True)
    shared.write_text("another gunicorn's socket")
    before = shared.stat().st_ino
    env = {**provider_env(fake_upstream.url), "HOME": str(home), "XDG_RUNTIME_DIR": ""}
    server = gunicorn(free_port(), env)
    try:
        time.sleep(1.0)  # the arbiter starts its control server on a thread of its own
        assert shared.exists() and shared.stat().st_ino == before, "the other instance's socket was replaced"
    finally:
        server.stop()
    assert shared.exists() and shared.read_text() == "another gunicorn's socket"

    own = tmp_path / "relay.ctl"
    server = gunicorn(free_port(), {**env, "CONTROL_SOCKET": str(own)})
    try:
        deadline = time.monotonic() + 10
        while not own.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert own.is_socket()
    finally:
        server.stop()
    assert shared.read_text() == "another gunicorn's socket"


def test_the_health_port_answers_while_the_workers_event_loop_is_held(tmp_path, fake_upstream):
    """Issue 24: /healthz on the main port is served by the workers' event loops, among the
    streams, and a burst of stream creations held it for seconds. HEALTH_BIND opens a port
    answered by a thread of gunicorn's master. Here the only worker is stopped outright
    (SIGSTOP): the main port's /healthz cannot answer, the health port still does."""
    health_port = free_port()
    env = {**provider_env(fake_upstream.url), "HEALTH_BIND": f"127.0.0.1:{health_port}"}
    server = gunicorn(free_port(), env)
    health = f"http://127.0.0.1:{health_port}/healthz"
    try:
        deadline = time.monotonic() + 10
        while requests.get(health, timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert requests.get(health, timeout=5).json() == {"status": "ok", "workers": 1}
        assert requests.head(health, timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{health_port}/", timeout=5).status_code == 404
        worker = int(subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        os.kill(worker, signal.SIGSTOP)
        try:
            with pytest.raises(requests.Timeout):
                requests.get(f"{server.url}/healthz", timeout=2)  # the control: the worker is held
            assert requests.get(health, timeout=2).json()["status"] == "ok"
        finally:
            os.kill(worker, signal.SIGCONT)
    finally:
        server.stop()


def test_the_health_port_says_unavailable_when_no_worker_is_alive():
    """503 when no worker told the master it was alive within gunicorn's timeout."""
    config = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))
    check = config["HealthCheck"]

    class Tmp:
        def __init__(self, age):
            self.age = age

        def last_update(self):
            return time.monotonic() - self.age

    class Arbiter:
        timeout = 30
        WORKERS = {}

    handler = check.__new__(check)
    handler.arbiter = Arbiter
    assert handler._serving_workers() == 0
    Arbiter.WORKERS = {1: SimpleNamespace(tmp=Tmp(45)), 2: SimpleNamespace(tmp=Tmp(1))}
    assert handler._serving_workers() == 1
    Arbiter.WORKERS = {1: SimpleNamespace(tmp=Tmp(45))}
    assert handler._serving_workers() == 0
