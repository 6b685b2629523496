"""Deployments for real: Apache + mod_wsgi (apache/serve-local.sh), gunicorn, and Apache
as a reverse proxy in front of gunicorn, each against the fake upstream."""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from tests.conftest import free_port, open_stream, provider_env, require, text_of
from tests.fake_upstream import BODIES, Reply
from tests.servers import apache, gunicorn

pytestmark = pytest.mark.apache

PACED = [f"tok{i} " for i in range(10)]
FIRST_TOKEN_CHUNK = 2  # openai_body: role chunk, a comment, then one chunk per token


# serve-local.sh's modules: PyPI's mod-wsgi (the default, built into its venv) and Debian's.
MOD_WSGI = os.environ.get("RELAY_MOD_WSGI", "pypi")
OTHER_MOD_WSGI = {"pypi": "debian", "debian": "pypi"}[MOD_WSGI]


def have_mod_wsgi(module: str) -> bool:
    if module == "debian":
        return os.path.exists("/usr/lib/apache2/modules/mod_wsgi.so")
    return bool(shutil.which("apxs") and glob.glob("/usr/include/python3*/Python.h"))


def have_apache() -> bool:
    return bool(shutil.which("apache2") or os.path.exists("/usr/sbin/apache2")) and have_mod_wsgi(MOD_WSGI)


@pytest.fixture(scope="module")
def relay_env(fake_upstream):
    require(have_apache(), "apache2 and mod_wsgi (apt-get install apache2 apache2-dev python3-dev, "
                           "or RELAY_MOD_WSGI=debian with libapache2-mod-wsgi-py3)")
    return {**provider_env(fake_upstream.url), "SSE_HEARTBEAT_SECONDS": "1", "UPSTREAM_READ_TIMEOUT": "30",
            "DEMO_FIRST_TOKEN_DELAY": "0"}


@pytest.fixture(scope="module")
def apache_url(relay_env):
    server = apache(free_port(), relay_env)
    yield server.url
    assert server.stop() is not None


STREAM_ROUTES = {
    # route: (path, JSON body or None for GET, the text of one event or None)
    "relay": ("/api/chat/stream?provider=openai&prompt=hi", None,
              lambda e: e.data["text"] if e.event == "token" else None),
    "openai": ("/v1/chat/completions", {"model": "openai/gpt-4.1", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]},
               lambda e: (e.data["choices"][0]["delta"].get("content") or None)
               if isinstance(e.data, dict) and e.data.get("choices") else None),
    "responses": ("/v1/responses", {"model": "openai/gpt-4.1", "input": "hi", "stream": True},
                  lambda e: e.data["delta"] if isinstance(e.data, dict)
                  and e.data.get("type") == "response.output_text.delta" else None),
    "anthropic": ("/v1/messages", {"model": "openai/gpt-4.1", "max_tokens": 50, "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]},
                  lambda e: e.data["delta"]["text"] if isinstance(e.data, dict)
                  and e.data.get("type") == "content_block_delta" and e.data["delta"].get("type") == "text_delta"
                  else None),
    "ai-sdk": ("/api/chat/ui", {"id": "c", "provider": "openai",
                                "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]},
               lambda e: e.data["delta"] if isinstance(e.data, dict) and e.data.get("type") == "text-delta" else None),
}


def assert_streams_incrementally(url: str, upstream, headers=None, route: str = "relay"):
    """Each token reaches the client soon after the upstream sent it, not all at the end."""
    path, body, text = STREAM_ROUTES[route]
    upstream.reset(Reply(chunks=BODIES["openai"](PACED), delay=0.2))
    reader = open_stream(f"{url}{path}", json_body=body, headers={"Accept-Encoding": "gzip, br", **(headers or {})})
    events = reader.read_all()
    assert "Content-Encoding" not in reader.response.headers
    tokens = [e for e in events if text(e)]
    assert "".join(text(e) for e in tokens) == "".join(PACED)
    sent = upstream.last().sent
    lags = [token.at - sent[FIRST_TOKEN_CHUNK + i] for i, token in enumerate(tokens)]
    # 200 ms between tokens upstream: a buffered stream would show lags of seconds.
    assert max(lags) < 0.15, lags
    return reader


@pytest.mark.parametrize("route", list(STREAM_ROUTES))
def test_sse_is_not_compressed_and_arrives_token_by_token(route, apache_url, upstream):
    reader = assert_streams_incrementally(apache_url, upstream, route=route)
    assert reader.response.headers["Content-Type"] == "text/event-stream; charset=utf-8"


def test_the_other_mod_wsgi_serves_the_relay_too(relay_env, upstream):
    """Both modules stay supported (apache/README.md): the one not under test streams token by
    token, answers its health check and ends the upstream of a client that left."""
    require(have_mod_wsgi(OTHER_MOD_WSGI), f"mod_wsgi from {OTHER_MOD_WSGI}")
    server = apache(free_port(), {**relay_env, "RELAY_MOD_WSGI": OTHER_MOD_WSGI})
    try:
        assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
        assert_streams_incrementally(server.url, upstream)
        assert_streams_incrementally(server.url, upstream, route="openai")
        upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(300)]), delay=0.05))
        reader = open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi")
        reader.until("token")
        reader.close()
        assert upstream.wait_for_request().closed.wait(5), "upstream still open after the client left"
        root = server.output().split("(logs: ")[1].split("/logs)")[0]
        started = open(f"{root}/logs/error.log").read()
        assert {"pypi": "mod_wsgi/6.", "debian": "mod_wsgi/4."}[OTHER_MOD_WSGI] in started
    finally:
        server.stop()


def test_page_and_json_routes_are_still_gzipped(apache_url):
    page = requests.get(f"{apache_url}/", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
    assert page.headers.get("Content-Encoding") == "gzip"
    assert b"llm-sse-relay" in gzip.decompress(page.raw.read())
    rest = requests.post(f"{apache_url}/api/chat", json={"prompt": "hi", "model": "demo-fast"},
                         headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert rest.headers.get("Content-Encoding") == "gzip" and rest.json()["content"].startswith("You asked")


def test_env_file_reaches_the_app_and_bad_input_is_json(apache_url, upstream):
    response = requests.get(f"{apache_url}/api/chat/stream?prompt=hi&provider=nope", timeout=10)
    assert response.status_code == 400 and response.json()["error"]["type"] == "unknown_provider"
    # GEMINI_API_KEY and GEMINI_BASE_URL reach the daemon only through the env file.
    upstream.reset(Reply(chunks=BODIES["gemini"](["from ", "gemini"])))
    events = open_stream(f"{apache_url}/api/chat/stream?provider=gemini&prompt=hi").read_all()
    assert text_of(events) == "from gemini"
    assert upstream.last().headers["x-goog-api-key"] == "test-key"


def test_client_disconnect_closes_the_upstream(apache_url, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(300)]), delay=0.05))
    reader = open_stream(f"{apache_url}/api/chat/stream?provider=openai&prompt=hi")
    reader.until("token")
    left = time.monotonic()
    reader.close()
    seen = upstream.wait_for_request()
    assert seen.closed.wait(5), "upstream still open after the client left"
    assert seen.closed_at - left < 2.5  # within a heartbeat (1 s) and Apache's hand-off


def test_open_streams_do_not_starve_pages(relay_env, upstream):
    """Every thread of the SSE group held by open streams: pages, health and the POST that
    creates a POST-SSE stream still answer."""
    env = {**relay_env, "RELAY_SSE_PROCESSES": "1", "RELAY_SSE_THREADS": "3"}
    server = apache(free_port(), env)
    try:
        upstream.reset(Reply(chunks=BODIES["openai"](["a", "b"]), stall_after=3))
        readers = [open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi") for _ in range(3)]
        upstream.wait_for_request(3)
        # A fourth stream queues behind them (its headers wait for a free stream thread).
        queued = threading.Thread(target=lambda: readers.append(
            open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi")), daemon=True)
        queued.start()
        time.sleep(0.3)
        started = time.monotonic()
        assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200
        # Creating a POST-SSE stream is answered by the pages' group too (opening it is not).
        created = requests.post(f"{server.url}/api/chat/streams", json={"provider": "openai", "prompt": "hi"},
                                timeout=10)
        assert created.ok and created.json()["stream_url"].startswith("/api/chat/streams/")
        waited = time.monotonic() - started
        statuses = [r.response.status_code for r in readers]
        assert len(upstream.seen) == 3, statuses  # the fourth stream is queued, all three threads busy
        assert all(not s.closed.is_set() for s in upstream.seen)
        assert waited < 5  # "quickly": not queued behind streams that never end
        for reader in list(readers):
            reader.close()
        upstream.wait_for_request(4, timeout=10)  # a thread freed: the queued stream starts
        queued.join(5)
    finally:
        server.stop()


def test_health_checks_answer_while_every_thread_of_the_pages_group_is_busy(relay_env):
    """A load balancer's health check must not queue behind the pages' group: here each of its
    threads waits for a request body that trickles in (as under a burst of stream creations,
    when every thread is busy at its turn of the GIL). Nor can bodies sent to /healthz itself
    hold the health group's own two threads: a check has no body, so Apache refuses one
    before it reaches the group."""
    env = {**relay_env, "RELAY_APP_PROCESSES": "1", "RELAY_APP_THREADS": "2"}
    server = apache(free_port(), env)
    port = int(server.url.rsplit(":", 1)[1])
    slow = []

    def trickle(head: bytes) -> socket.socket:
        """A request whose body never finishes arriving."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head + b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n")
        slow.append(sock)
        return sock

    try:
        for _ in range(2):
            trickle(b"POST /api/chat/streams HTTP/1.1\r\n").sendall(b"Content-Length: 4000\r\n\r\n{\"prompt\": \"")
        time.sleep(0.5)  # both bodies are being read by the group's two threads

        def load_page():
            try:
                requests.get(f"{server.url}/", timeout=30)
            except requests.RequestException:
                pass  # cut when the server stops at the end of the test

        page = threading.Thread(target=load_page, daemon=True)
        page.start()
        page.join(1.0)
        assert page.is_alive(), "the pages' group was not busy: this test proves nothing"
        bodies_to_health = [
            trickle(b"POST /healthz HTTP/1.1\r\n"), trickle(b"GET /healthz HTTP/1.1\r\n"),
            trickle(b"GET /healthz/x HTTP/1.1\r\n"), trickle(b"GET /healthz HTTP/1.1\r\n")]
        for sock in bodies_to_health[:3]:
            sock.sendall(b"Content-Length: 4000\r\n\r\n{")
        bodies_to_health[3].sendall(b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        time.sleep(0.5)  # had they reached the health group, they would hold both its threads
        # Queued behind the slow bodies, it would wait for mod_reqtimeout to cut them (20 s).
        assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
        assert requests.head(f"{server.url}/healthz", timeout=10).status_code == 200
        assert requests.get(f"{server.url}/healthz", headers={"Content-Length": "0"}, timeout=10).ok
    finally:
        for sock in slow:
            sock.close()
        server.stop()


def daemon_pids(server, group: str) -> set[int]:
    """The processes of one mod_wsgi daemon group of this Apache (display-name=%{GROUP})."""
    root = server.output().split("(logs: ")[1].split("/logs)")[0]
    parent = open(f"{root}/run/httpd.pid").read().strip()
    listing = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", parent], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in listing.splitlines() if f"(wsgi:{group})" in line}


def test_slow_answers_that_are_not_streamed_never_restart_the_pages_group(relay_env, upstream):
    """Finding (issue 20): non-streaming answers (`POST /api/chat`, `/v1` without `stream`) send
    nothing until the model is done. In the pages' group (relay-app) a slow one was cut by
    the I/O timeout (504) while it went on generating, and a few of them at once tripped the
    group's request-timeout (the average over its threads): the daemon restarted, and every
    page it was serving got a 500. Here with every timeout at 2 s and answers of 4 s: they are
    served in full, pages answer meanwhile, and the pages' group is never restarted."""
    env = {**relay_env, "RELAY_IO_TIMEOUT": "2", "RELAY_APP_PROCESSES": "1", "RELAY_APP_THREADS": "2",
           "RELAY_APP_REQUEST_TIMEOUT": "2", "MAX_STREAMS_PER_CLIENT": "0"}
    server = apache(free_port(), env)
    try:
        pages = daemon_pids(server, "relay-app")
        assert len(pages) == 1
        slow = Reply(chunks=BODIES["openai"](["slow ", "answer"]), head_delay=4.0)  # a model that thinks first
        upstream.reset(slow)
        rest = {"provider": "openai", "prompt": "hi"}
        openai = {"model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
        results: dict[int, requests.Response | Exception] = {}

        def ask(i: int, path: str, body: dict) -> None:
            try:
                results[i] = requests.post(f"{server.url}{path}", json=body, timeout=30)
            except requests.RequestException as exc:
                results[i] = exc

        askers = [threading.Thread(target=ask, args=(i, "/api/chat", rest)) for i in range(3)]
        askers.append(threading.Thread(target=ask, args=(3, "/v1/chat/completions", openai)))
        for asker in askers:
            asker.start()
        upstream.wait_for_request(4, timeout=10)
        page = requests.get(f"{server.url}/", timeout=10)  # while all four think
        assert page.status_code == 200
        for asker in askers:
            asker.join(30)
        codes = [getattr(results.get(i), "status_code", results.get(i)) for i in range(4)]
        assert codes == [200, 200, 200, 200], codes
        assert all(results[i].json()["content"] == "slow answer" for i in range(3))
        assert results[3].json()["choices"][0]["message"]["content"] == "slow answer"
        time.sleep(1.0)  # mod_wsgi's monitor would have seen a request-timeout by now
        assert daemon_pids(server, "relay-app") == pages, "the pages' group was restarted"
        assert requests.get(f"{server.url}/", timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_client_that_stops_reading_a_stream_is_dropped_after_the_io_timeout(relay_env, upstream):
    """The stream group waits long for its daemons (RELAY_ANSWER_TIMEOUT, for answers that are
    not streamed), but a write to a client that stopped reading still gives up after
    RELAY_IO_TIMEOUT (response-socket-timeout), and its answer stops."""
    server = apache(free_port(), {**relay_env, "RELAY_IO_TIMEOUT": "2"})
    try:
        big = "x" * 4000  # far more than every socket buffer in between
        upstream.reset(Reply(chunks=BODIES["openai"]([big] * 4000)))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        sock.sendall(b"GET /api/chat/stream?provider=openai&prompt=hi HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            seen = upstream.wait_for_request(timeout=10)
            assert seen.closed.wait(30), "the upstream is still held for a client that never reads"
        finally:
            sock.close()
    finally:
        server.stop()


@pytest.mark.parametrize("heartbeat,survives", [(0.5, True), (10, False)])
def test_stream_outlives_apache_timeouts_thanks_to_heartbeats(relay_env, upstream, heartbeat, survives):
    """Apache and mod_wsgi I/O timeouts of 2 s, an upstream silent for 5 s mid-answer. (The
    stream group waits RELAY_ANSWER_TIMEOUT for a read, so that answers that are not streamed
    can take long: at 2 s as well here, for the control to show what heartbeats are for.)"""
    env = {**relay_env, "RELAY_IO_TIMEOUT": "2", "RELAY_ANSWER_TIMEOUT": "2", "SSE_HEARTBEAT_SECONDS": str(heartbeat)}
    server = apache(free_port(), env)
    try:
        pieces = ["before ", "the ", "pause ", "and ", "after"]
        upstream.reset(Reply(chunks=BODIES["openai"](pieces), pauses={FIRST_TOKEN_CHUNK + 3: 5.0}))
        reader = open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi")
        try:
            events = reader.read_all()
        except requests.exceptions.RequestException:
            events = reader.events
        if survives:
            assert text_of(events) == "".join(pieces) and events[-1].event == "done"
            assert reader.comments.count("ping") >= 5
        else:  # the control: without heartbeats these timeouts do cut the stream
            assert not events or events[-1].event != "done"
    finally:
        server.stop()


def test_serve_local_stops_cleanly_on_sigterm(relay_env):
    server = apache(free_port(), relay_env)
    marker = server.output().split("logs: ")[-1].split("/logs")[0]
    assert server.stop() is not None
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert left == [] and not os.path.exists(marker)


@pytest.fixture(scope="module")
def gunicorn_url(fake_upstream, tmp_path_factory):
    store = tmp_path_factory.mktemp("gunicorn") / "relay.sqlite3"
    # One test client opens 50 streams at once here: the per-client cap (default 8) is off.
    env = {**provider_env(fake_upstream.url), "SSE_HEARTBEAT_SECONDS": "1", "STORE_URL": f"sqlite:///{store}",
           "MAX_STREAMS_PER_CLIENT": "0"}
    server = gunicorn(free_port(), env)
    yield server.url
    server.stop()


def test_gunicorn_dev_setup_streams_incrementally(gunicorn_url, upstream):
    assert_streams_incrementally(gunicorn_url, upstream)


def test_gunicorn_holds_many_open_streams_in_one_worker(gunicorn_url, upstream):
    upstream.reset(Reply(chunks=BODIES["openai"](["x"]), stall_after=3))
    readers = [open_stream(f"{gunicorn_url}/api/chat/stream?provider=openai&prompt=hi") for _ in range(50)]
    upstream.wait_for_request(50, timeout=20)
    assert requests.get(f"{gunicorn_url}/healthz", timeout=5).status_code == 200
    threads = [threading.Thread(target=r.close) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seen in upstream.seen:
        assert seen.closed.wait(5)


def test_apache_reverse_proxy_to_gunicorn_streams_incrementally(relay_env, gunicorn_url, upstream):
    proxy = apache(free_port(), relay_env, proxy_to=gunicorn_url)
    try:
        assert_streams_incrementally(proxy.url, upstream)
        page = requests.get(f"{proxy.url}/", headers={"Accept-Encoding": "gzip"}, timeout=10)
        assert page.headers.get("Content-Encoding") == "gzip"
    finally:
        proxy.stop()


def test_the_request_id_is_the_proxy_s_never_the_client_s(relay_env, fake_upstream, upstream):
    """Finding (issue 20): behind Apache's proxy (TRUSTED_PROXIES=1, as proxy-gunicorn.conf
    says) the client's X-Request-ID reached the app, which takes it from a trusted proxy: callers
    chose the ids on the relay's log lines. Apache now sets its own (mod_unique_id) or none."""
    backend = gunicorn(free_port(), {**provider_env(fake_upstream.url), "TRUSTED_PROXIES": "1",
                                     "STORE_URL": "memory://"})
    proxy = apache(free_port(), relay_env, proxy_to=backend.url)
    try:
        chosen = {"X-Request-ID": "chosen-by-the-client"}
        upstream.reset(Reply(chunks=BODIES["openai"](["a"])))
        for response in (requests.get(f"{proxy.url}/api/capabilities", headers=chosen, timeout=10),
                         requests.get(f"{proxy.url}/api/chat/stream?provider=openai&prompt=hi", headers=chosen,
                                      timeout=10)):
            assert response.ok and response.headers["X-Request-ID"] != "chosen-by-the-client"
        given = response.headers["X-Request-ID"]
        msgid = next(line for line in response.text.split("\n") if line.startswith('data: {"id"'))
        assert given in msgid
    finally:
        proxy.stop()
        backend.stop()


def ask_slow_answers(url: str, upstream) -> None:
    """A REST answer and a non-streamed /v1 answer that each take 4 s before their first byte
    (a model that thinks first) come back whole."""
    upstream.reset(Reply(chunks=BODIES["openai"](["slow ", "answer"]), head_delay=4.0))
    rest = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi"}, timeout=30)
    assert rest.status_code == 200 and rest.json()["content"] == "slow answer"
    completion = requests.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "openai/gpt-4.1", "messages": [{"role": "user", "content": "hi"}]})
    assert completion.status_code == 200 and completion.json()["choices"][0]["message"]["content"] == "slow answer"


def test_slow_answers_that_are_not_streamed_pass_the_reverse_proxy(relay_env, gunicorn_url, upstream):
    """The same answers as above through Apache's mod_proxy (proxy-gunicorn.conf), its read
    timeout at 2 s: it was the same for every route, and cut them with a 504."""
    proxy = apache(free_port(), {**relay_env, "RELAY_IO_TIMEOUT": "2"}, proxy_to=gunicorn_url)
    try:
        ask_slow_answers(proxy.url, upstream)
    finally:
        proxy.stop()


def test_gunicorn_accepts_a_get_prompt_up_to_its_raised_request_line_limit(gunicorn_url):
    prompt = "y" * 7000  # over gunicorn's stock 4094-byte request line, under 8190
    response = requests.get(f"{gunicorn_url}/api/chat/stream", params={"prompt": prompt, "provider": "demo",
                                                                       "model": "demo-fast"}, timeout=20)
    assert response.status_code == 200 and "event: done" in response.text


def test_graceful_restart_continues_the_running_answers(relay_env, upstream):
    """`apachectl graceful` restarts mod_wsgi's daemons at once, producers included; the readers
    reconnect and a new daemon adopts each answer where the store has it (apache/README.md)."""
    from tests.test_deploys import resumable_read

    long_answer = [f"w{i} " for i in range(60)]
    upstream.reset(*[Reply(chunks=BODIES["openai"](long_answer), delay=0.1)] * 3,
                   Reply(chunks=BODIES["openai"](["THE END."])))
    server = apache(free_port(), {**relay_env, "MAX_STREAMS_PER_CLIENT": "0", "MAX_TICKETS_PER_CLIENT": "0",
                                     "MAX_READERS_PER_CLIENT": "0"})
    try:
        tickets = [requests.post(f"{server.url}/api/chat/streams", json={"provider": "openai", "prompt": f"q{i}"},
                                 timeout=10).json() for i in range(3)]
        logs: list[dict] = [{} for _ in tickets]
        readers = [threading.Thread(target=resumable_read, args=(server.url, t["stream_url"], log), daemon=True)
                   for t, log in zip(tickets, logs, strict=True)]
        for reader in readers:
            reader.start()
        upstream.wait_for_request(3, timeout=20)
        time.sleep(1.5)
        root = server.output().split("(logs: ")[1].split("/logs)")[0]
        os.kill(int(open(f"{root}/run/httpd.pid").read()), signal.SIGUSR1)  # apachectl graceful
        for reader in readers:
            reader.join(60)
    finally:
        server.stop()
    full = "".join(long_answer)
    for log in logs:
        assert log.get("end") == "done", log
        assert log["text"].endswith("THE END.") and full.startswith(log["text"].removesuffix("THE END."))
        assert log["reconnects"] >= 1
    assert len(upstream.seen) == 6  # each answer asked once, and continued once
