"""The wait for an upstream's response headers (a model loading can take a minute): on the
thread that drives the stream, in slices of `idle_after` (heartbeats, client-gone checks in
between), with no thread per call; a cancel closes the upstream connection; a failed
connect or a silent upstream is the same error as `requests` raises, and ours after it."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

import pytest
import requests

from app.config import Settings
from app.providers import build_providers
from app.providers.domain import IDLE, Cancellation, Idle, ProviderError, Task, Text
from tests.conftest import free_port, open_stream, provider_env, text_of
from tests.fake_upstream import BODIES, FakeUpstream, Reply, self_signed_tls
from tests.servers import gunicorn

ANSWER = BODIES["openai"](["late ", "but ", "whole"])


def openai(url: str, **settings: str):
    env = {**provider_env(url), "UPSTREAM_MAX_RETRIES": "0", "UPSTREAM_RETRY_BASE_SECONDS": "0.01", **settings}
    return build_providers(env, Settings.load(env))["openai"]


def task() -> Task:
    return Task(messages=[{"role": "user", "content": "hi"}], model="gpt-4.1-mini")


def answer_of(deltas) -> str:
    return "".join(d.text for d in deltas if type(d) is Text)


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    context, ca_bundle = self_signed_tls(tmp_path_factory.mktemp("tls"))
    server = FakeUpstream(tls=context)  # TLS 1.3: session tickets arrive before the answer
    yield server, ca_bundle
    server.close()


class Listener:
    """A server on 127.0.0.1 (TLS when given a context) that hands each connection to
    `_handle` on a thread of its own."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"

    def start(self) -> None:
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class Scripted(Listener):
    """An upstream on a raw socket, one script per connection: "silent" reads the request and
    then waits for the relay to leave (recording when), "answer" answers it, "closes" closes
    without a word, "reset" resets the connection, "garbage" answers what is not HTTP."""

    def __init__(self, *scripts: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.scripts = list(scripts)
        self.requests: list[bytes] = []
        self.gone: list[float] = []  # when each silent connection was closed by the relay
        self.gone_event = threading.Event()
        self._scripts_lock = threading.Lock()
        self.start()

    def _handle(self, conn: socket.socket) -> None:
        with self._scripts_lock:  # taken in the order the connections came
            script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:  # the relay did not trust it
                conn.close()
                return
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.requests.append(data)
            if script == "silent":
                try:
                    while conn.recv(1024):
                        pass
                except OSError:  # a reset
                    pass
                self.gone.append(time.monotonic())
                self.gone_event.set()
            elif script == "answer":
                body = b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in ANSWER) + b"0\r\n\r\n"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + body)
            elif script == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif script == "garbage":
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


def threads_started_here(monkeypatch) -> list[threading.Thread]:
    """The threads this (the test's) thread starts from now on."""
    started: list[threading.Thread] = []
    here = threading.current_thread()
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if threading.current_thread() is here:
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    return started


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_slow_headers_idle_on_the_driving_thread_and_start_no_thread(scheme, upstream, tls_upstream, monkeypatch):
    if scheme == "https":
        upstream, ca_bundle = tls_upstream
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_bundle)
    provider = openai(upstream.url)
    upstream.reset(Reply(chunks=ANSWER, head_delay=1.2, keep_alive=True))
    started = threads_started_here(monkeypatch)
    idle_at: list[float] = []
    begun = time.monotonic()
    deltas = []
    for delta in provider.stream(task(), Cancellation(idle_after=0.2)):
        deltas.append(delta)
        if delta is IDLE:
            idle_at.append(time.monotonic() - begun)
    assert answer_of(deltas) == "late but whole"
    assert started == [], [t.name for t in started]
    # Heartbeat chances all through the wait, not only at its end (over TLS too, where the
    # server's session tickets make the socket readable long before the answer).
    assert len(idle_at) >= 3, idle_at
    # A second call reuses the kept-alive connection (the response went back to the pool clean).
    upstream.reset(Reply(chunks=ANSWER, keep_alive=True))
    assert answer_of(provider.stream(task(), Cancellation(idle_after=0.2))) == "late but whole"
    assert upstream.seen[0].connection == upstream.seen[-1].connection or scheme == "https"


@pytest.mark.parametrize("how", ["driver", "other-thread", "generator-closed"])
def test_a_cancel_while_waiting_for_headers_closes_the_upstream_connection(how):
    upstream = Scripted("silent", "answer")
    provider = openai(upstream.url, UPSTREAM_READ_TIMEOUT="30")
    cancel = Cancellation(idle_after=0.1)
    stream = provider.stream(task(), cancel)
    deltas = []
    try:
        for delta in stream:
            deltas.append(delta)
            if delta is IDLE and len(deltas) >= 3:
                if how == "driver":  # the relay noticed its client left
                    cancel.cancel("client left")
                elif how == "other-thread":
                    threading.Timer(0.05, cancel.cancel).start()
                else:
                    stream.close()
                    break
        assert all(type(d) is Idle for d in deltas)
        # At once, not when the upstream answers or its read timeout (30 s) runs out.
        assert upstream.gone_event.wait(5), "the upstream connection is still open"
        # The connection was not put back in the pool half-used: the next call gets a new one.
        assert answer_of(provider.stream(task(), Cancellation(idle_after=0.1))) == "late but whole"
        assert len(upstream.requests) == 2
    finally:
        upstream.close()


def closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"


def full_backlog():
    """A listener whose queue is full: a connect to it waits (SYNs dropped) until its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    return f"http://127.0.0.1:{listener.getsockname()[1]}", [listener, *fillers]


FAILURES = {
    # where the upstream is: what requests raises, our error
    "refused": (requests.ConnectionError, "upstream_unreachable"),
    "connect-timeout": (requests.ConnectTimeout, "upstream_timeout"),
    "silent": (requests.ReadTimeout, "upstream_timeout"),
    "closes": (requests.ConnectionError, "upstream_unreachable"),
    "reset": (requests.ConnectionError, "upstream_unreachable"),
    "garbage": (requests.ConnectionError, "upstream_unreachable"),
    "untrusted-tls": (requests.exceptions.SSLError, "upstream_unreachable"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_call_is_the_error_requests_raises_and_ours_after_it(failure, tmp_path):
    held: list = []
    if failure == "refused":
        url = closed_port()
    elif failure == "connect-timeout":
        url, held = full_backlog()
    elif failure == "untrusted-tls":
        context, _ = self_signed_tls(tmp_path)
        server = Scripted("answer", tls=context)
        url, held = server.url, [server]
    else:
        server = Scripted(failure)
        url, held = server.url, [server]
    expected, kind = FAILURES[failure]
    provider = openai(url, UPSTREAM_CONNECT_TIMEOUT="0.5", UPSTREAM_READ_TIMEOUT="0.8")
    try:
        # requests' own call, as without heartbeats
        request = provider._prepared(f"{url}/chat/completions", {"Content-Type": "application/json"}, {})
        with pytest.raises(requests.RequestException) as direct:
            provider.session.send(request, stream=True, timeout=(0.5, 0.8), verify=provider.session.verify,
                                  proxies=provider.session.proxies)
        assert type(direct.value) is expected
        # the same call waiting in slices
        sliced = provider._send(f"{url}/chat/completions", {"Content-Type": "application/json"}, {},
                                Cancellation(idle_after=0.1))
        with pytest.raises(requests.RequestException) as waited:
            for _ in sliced:
                pass
        assert type(waited.value) is expected, waited.value
        # and ours, with heartbeats
        with pytest.raises(ProviderError) as ours:
            list(provider.stream(task(), Cancellation(idle_after=0.1)))
        assert ours.value.type == kind and ours.value.retryable
        assert "127.0.0.1" not in ours.value.message
    finally:
        for thing in held:
            thing.close()


def tls_upstream_context(directory, ca_bundle: str) -> ssl.SSLContext:
    """A server context with the TLS upstream's certificate (the one CA bundle trusts both)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca_bundle, ca_bundle.replace(".crt", ".key"))
    return context


class Proxy(Listener):
    """An HTTP proxy: CONNECT tunnels, and absolute-URL requests passed on (as origin-form);
    spoken to over TLS when given a context."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.request_lines: list[str] = []
        self.start()

    def _handle(self, client: socket.socket) -> None:
        if self.tls is not None:
            client = self.tls.wrap_socket(client, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            data += client.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        line = head.split(b"\r\n")[0].decode()
        self.request_lines.append(line)
        method, target, version = line.split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            scheme_host, _, path = target.partition("://")[2].partition("/")
            host, port = scheme_host.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            upstream.sendall(f"{method} /{path} {version}".encode() + b"\r\n" + head.split(b"\r\n", 1)[1]
                             + b"\r\n\r\n" + rest)

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)


@pytest.mark.parametrize("scheme,proxy_tls", [("http", False), ("https", False), ("https", True)])
def test_proxies_from_the_environment_are_used_while_waiting_in_slices(scheme, proxy_tls, upstream, tls_upstream,
                                                                       tmp_path, monkeypatch):
    if scheme == "https":
        upstream, ca_bundle = tls_upstream
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_bundle)
    proxy = Proxy(tls_upstream_context(tmp_path, ca_bundle) if proxy_tls else None)
    try:
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        provider = openai(upstream.url)
        upstream.reset(Reply(chunks=ANSWER, head_delay=0.5))
        started = threads_started_here(monkeypatch)
        deltas = list(provider.stream(task(), Cancellation(idle_after=0.1)))
        assert answer_of(deltas) == "late but whole" and deltas.count(IDLE) >= 2 and started == []
        host = upstream.url.split("://")[1]
        # HTTP through a proxy: the absolute URL; HTTPS: a CONNECT tunnel, TLS inside it.
        [line] = proxy.request_lines
        assert line.startswith(f"CONNECT {host} " if scheme == "https" else f"POST {upstream.url}/chat/completions ")
    finally:
        proxy.close()


def test_a_cancel_through_an_https_proxy_ends_the_header_wait_at_once(tmp_path, monkeypatch):
    """Through an HTTPS proxy to an HTTPS upstream (TLS inside TLS) the connection's socket is
    urllib3's SSLTransport: the cancel must reach the socket under it, not wait out the slice
    (a heartbeat interval, the upstream generating meanwhile). Found in review."""
    context, ca_bundle = self_signed_tls(tmp_path)
    upstream = Scripted("silent", tls=context)
    proxy = Proxy(tls_upstream_context(tmp_path, ca_bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_bundle)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        provider = openai(upstream.url, UPSTREAM_READ_TIMEOUT="30")
        cancel = Cancellation(idle_after=5.0)  # one slice: a heartbeat interval
        cancelled_at: list[float] = []

        def cancel_soon() -> None:
            cancelled_at.append(time.monotonic())
            cancel.cancel("client left")

        threading.Timer(0.5, cancel_soon).start()
        list(provider.stream(task(), cancel))
        took = time.monotonic() - cancelled_at[0]
        assert took < 3.0, f"the header wait ended {took:.1f} s after the cancel"
        assert upstream.gone_event.wait(2), "the upstream connection is still open"
    finally:
        proxy.close()
        upstream.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_under_gevent_a_stream_waiting_for_headers_holds_up_no_other(scheme, upstream, tls_upstream):
    """gunicorn's gevent worker: one process, one event loop. The first stream's upstream
    answers after 4 s; a second stream in the same worker is answered meanwhile, and the
    first gets its heartbeats and then its answer."""
    env = {"SSE_HEARTBEAT_SECONDS": "0.3"}
    if scheme == "https":
        upstream, ca_bundle = tls_upstream
        env["REQUESTS_CA_BUNDLE"] = ca_bundle
    upstream.reset(Reply(chunks=ANSWER, head_delay=4.0), Reply(chunks=BODIES["openai"](["quick"])))
    server = gunicorn(free_port(), {**provider_env(upstream.url), **env})
    try:
        slow = open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi")
        upstream.wait_for_request()
        quick = open_stream(f"{server.url}/api/chat/stream?provider=openai&prompt=hi").read_all()
        assert text_of(quick) == "quick" and not upstream.seen[0].sent  # the first still waits
        events = slow.read_all()
        assert text_of(events) == "late but whole" and slow.comments.count("ping") >= 3
    finally:
        server.stop()


def test_where_urllib3_lacks_what_the_wait_needs_a_thread_waits_as_before(upstream, monkeypatch):
    from app.providers import upstream_body

    monkeypatch.setattr(upstream_body, "HEADER_WAIT", False)  # what a future urllib3 would bring
    provider = openai(upstream.url)
    upstream.reset(Reply(chunks=ANSWER, head_delay=1.0))
    started = threads_started_here(monkeypatch)
    deltas = list(provider.stream(task(), Cancellation(idle_after=0.2)))
    assert answer_of(deltas) == "late but whole" and deltas.count(IDLE) >= 3
    assert [t.name for t in started] == ["relay-upstream-headers"]
