"""The app under a real WSGI server against the fake upstream over real sockets."""

import time

import pytest
import requests

from tests.conftest import PROVIDERS, free_port, open_stream, provider_env, text_of
from tests.fake_upstream import BODIES, TRICKY_TEXT, FakeUpstream, Reply, hostile_chunks, self_signed_tls
from tests.servers import gunicorn


@pytest.mark.parametrize("name", PROVIDERS)
def test_relayed_text_equals_upstream_text_with_hostile_chunking(name, upstream, live):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[name](TRICKY_TEXT)), headers={"x-ratelimit-limit-requests": "5"}))
    url = live()
    events = open_stream(f"{url}/api/chat/stream?provider={name}&prompt=hi").read_all()
    assert events[0].event == "msgid" and events[0].data["provider"] == name
    assert text_of(events) == "".join(TRICKY_TEXT)
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "stop"
    ids = [int(e.id) for e in events]
    assert ids == sorted(set(ids))
    # the same upstream answer through the REST route gives the same text
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[name](TRICKY_TEXT))))
    rest = requests.post(f"{url}/api/chat", json={"provider": name, "prompt": "hi"}, timeout=10).json()
    assert rest["content"] == text_of(events)
    assert rest["finish_reason"] == "stop"


def test_close_delimited_upstream_body_streams_too(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"](["a", "b", "c"]), chunked=False))
    events = open_stream(f"{live()}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert text_of(events) == "abc"


def test_headers_and_retry_field(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"](["x"])))
    reader = open_stream(f"{live()}/api/chat/stream?provider=openai&prompt=hi")
    reader.read_all()
    headers = reader.response.headers
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache, no-transform"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in headers
    assert reader.retry == 3000


def test_post_stream_with_messages(upstream, live):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["fine"])))
    body = {"provider": "anthropic", "system": "s", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]}
    events = open_stream(f"{live()}/api/chat/stream", json_body=body).read_all()
    assert text_of(events) == "fine"
    assert upstream.last().body["system"] == "s" and len(upstream.last().body["messages"]) == 3


def test_tokens_arrive_as_the_upstream_sends_them(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"t{i} " for i in range(8)]), delay=0.15))
    reader = open_stream(f"{live()}/api/chat/stream?provider=openai&prompt=hi")
    tokens = [e for e in reader.read_all() if e.event == "token"]
    gaps = [b.at - a.at for a, b in zip(tokens, tokens[1:], strict=False)]
    # paced 150 ms apart upstream -> spread out here too, not delivered in one burst
    assert sum(gaps) > 0.6 and min(gaps) > 0.05


@pytest.mark.parametrize("stall", [False, True])
def test_client_disconnect_closes_the_upstream_within_a_heartbeat(stall, upstream, live):
    pieces = [f"w{i} " for i in range(200)]
    reply = Reply(chunks=BODIES["openai"](pieces), delay=0.05, stall_after=5 if stall else None)
    upstream.reset(reply)
    reader = open_stream(f"{live(SSE_HEARTBEAT_SECONDS=1)}/api/chat/stream?provider=openai&prompt=hi")
    reader.until("token")
    left_at = time.monotonic()
    reader.close()
    seen = upstream.wait_for_request()
    assert seen.closed.wait(3), "upstream connection still open"
    assert seen.closed_at - left_at < 1.5  # one heartbeat (1 s) plus scheduling slack
    assert len(upstream.seen) == 1


STALL = {"SSE_HEARTBEAT_SECONDS": "0.3", "UPSTREAM_READ_TIMEOUT": "1.5"}


def assert_heartbeats_then_timeout(url, upstream):
    """Against an upstream that stalls after its first token (STALL settings on the server)."""
    reader = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi")
    events = reader.read_all()
    assert text_of(events) == "a"
    assert events[-1].event == "error" and events[-1].data["type"] == "upstream_timeout"
    assert reader.comments.count("ping") >= 3
    assert upstream.last().closed.wait(2)


def test_stalled_upstream_gets_heartbeats_then_a_timeout_error(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"](["a", "b", "c"]), stall_after=3))
    assert_heartbeats_then_timeout(live(**STALL), upstream)


@pytest.mark.parametrize("name", ["openai", "anthropic", "gemini"])
def test_mid_stream_error_becomes_an_error_event(name, upstream, live):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES[name](["one ", "two ", "three"], error_after=2))))
    events = open_stream(f"{live()}/api/chat/stream?provider={name}&prompt=hi").read_all()
    assert text_of(events) == "one two "
    assert events[-1].event == "error" and events[-1].data["type"] == "upstream_error"
    assert len(upstream.seen) == 1  # no retry after the first token


def test_cut_stream_is_an_error(upstream, live):
    upstream.reset(Reply(chunks=BODIES["anthropic"](["partial"], done=False)))
    events = open_stream(f"{live()}/api/chat/stream?provider=anthropic&prompt=hi").read_all()
    assert events[-1].event == "error" and events[-1].data["type"] == "upstream_disconnected"


def test_401_before_the_stream(upstream, live):
    body = b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}'
    upstream.reset(Reply(status=401, content_type="application/json", chunks=[body]))
    url = live()
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert [e.event for e in events] == ["msgid", "error"]
    # The status, in our words: the provider's own message goes to the log.
    assert events[-1].data["status"] == 401 and "credentials" in events[-1].data["message"]
    assert "Incorrect API key" not in events[-1].data["message"]
    assert len(upstream.seen) == 1
    rest = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi"}, timeout=10)
    assert rest.status_code == 502 and "credentials" in rest.json()["error"]["message"]
    assert "Incorrect API key" not in rest.text


def test_429_with_retry_after_is_retried_before_the_first_token(upstream, live):
    upstream.reset(
        Reply(status=429, headers={"Retry-After": "0.2"}, content_type="application/json",
              chunks=[b'{"error": {"message": "Rate limit reached"}}']),
        Reply(chunks=BODIES["openai"](["after ", "retry"])),
    )
    events = open_stream(f"{live()}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert text_of(events) == "after retry"
    retry = [e.data["retry"] for e in events if e.event == "meta" and "retry" in e.data]
    assert retry[0]["status"] == 429 and retry[0]["delay"] == 0.2
    assert upstream.seen[1].opened_at - upstream.seen[0].opened_at >= 0.2


def test_500_retries_are_bounded_then_an_error(upstream, live):
    upstream.reset(Reply(status=500, content_type="application/json", chunks=[b'{"error": {"message": "boom"}}']))
    events = open_stream(f"{live(UPSTREAM_MAX_RETRIES=2)}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert events[-1].event == "error" and events[-1].data["status"] == 500
    assert len(upstream.seen) == 3


def test_unreachable_upstream_is_an_error_event(make_app, serve):
    app = make_app(OPENAI_BASE_URL="http://127.0.0.1:9", UPSTREAM_MAX_RETRIES=0)
    events = open_stream(f"{serve(app)}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert events[-1].event == "error" and events[-1].data["type"] == "upstream_unreachable"


def test_demo_streams_with_no_key(make_app, serve):
    url = serve(make_app(OPENAI_API_KEY=""))
    events = open_stream(f"{url}/api/chat/stream?prompt=hi").read_all()
    assert events[0].data["provider"] == "demo"
    assert len([e for e in events if e.event == "token"]) > 20
    assert events[-1].event == "done" and events[-1].data["usage"]["output_tokens"] > 20


def test_upstream_keep_alive_connection_is_reused_cleanly(upstream, live):
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT)), keep_alive=True))
    url = live()
    for _ in range(3):
        events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
        assert text_of(events) == "".join(TRICKY_TEXT) and events[-1].event == "done"
    assert len(upstream.seen) == 3
    assert len({seen.connection for seen in upstream.seen}) == 1  # one TCP (and TLS) handshake for all


def test_an_http_proxy_named_in_the_environment_carries_upstream_calls(upstream, make_app, serve, monkeypatch):
    # The fake upstream plays the forward proxy: it answers whatever it is asked.
    monkeypatch.setenv("HTTP_PROXY", upstream.url)
    monkeypatch.setenv("NO_PROXY", "local.invalid,127.0.0.1")  # 127.0.0.1: this test's own client
    upstream.reset(Reply(chunks=BODIES["openai"](["via proxy"])))
    url = serve(make_app(OPENAI_BASE_URL="http://api.upstream.invalid/v1", OPENAI_COMPATIBLE_BASE_URL="http://local.invalid:9/v1",
                         UPSTREAM_MAX_RETRIES=0))
    events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert text_of(events) == "via proxy"
    assert upstream.last().path == "http://api.upstream.invalid/v1/chat/completions"
    # NO_PROXY: straight to the host (which does not exist), not through the proxy
    events = open_stream(f"{url}/api/chat/stream?provider=openai-compatible&prompt=hi").read_all()
    assert events[-1].data["type"] == "upstream_unreachable" and len(upstream.seen) == 1


def test_a_netrc_entry_for_the_upstream_host_does_not_replace_the_key(upstream, live, tmp_path, monkeypatch):
    # requests, trusting the environment, swapped the provider key for ~/.netrc's login.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    events = open_stream(f"{live()}/api/chat/stream?provider=openai&prompt=hi").read_all()
    assert text_of(events) == "ok"
    assert upstream.last().headers["authorization"] == "Bearer test-key"


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    context, ca_bundle = self_signed_tls(tmp_path_factory.mktemp("tls"))
    server = FakeUpstream(tls=context)
    yield server, ca_bundle
    server.close()


@pytest.mark.parametrize("server", ["gunicorn", "werkzeug"])
def test_an_https_upstream_streams(server, tls_upstream, make_app, serve, monkeypatch):
    # Every real provider is HTTPS. Under gunicorn the app is imported before gevent patches
    # ssl (the logger class lives in the app): urllib3 kept the unpatched SSLContext.
    upstream, ca_bundle = tls_upstream
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT))))
    if server == "gunicorn":
        process = gunicorn(free_port(), {**provider_env(upstream.url), "REQUESTS_CA_BUNDLE": ca_bundle})
        url = process.url
    else:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_bundle)
        url = serve(make_app(**provider_env(upstream.url)))
    try:
        events = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()
        assert text_of(events) == "".join(TRICKY_TEXT) and events[-1].event == "done", events[-1]
        if server == "gunicorn":
            assert "MonkeyPatchWarning" not in process.output()
    finally:
        if server == "gunicorn":
            process.stop()


def test_the_fast_upstream_reader_is_in_use_with_the_installed_urllib3():
    # If a urllib3 release moves the private attributes, the relay falls back (next test)
    # and this says so, instead of the speed silently going away.
    from app.providers import upstream_body

    assert upstream_body.private_reads_available() and upstream_body.FAST_READS


def test_the_fast_reader_asks_for_little_while_idle_and_for_more_as_data_piles_up():
    # A read that waits holds a buffer of the size it asked for: 64 kB per open stream when
    # every read asked for 64 kB (tracemalloc in a gunicorn worker holding 300 streams).
    from types import SimpleNamespace

    from app.providers import upstream_body

    def chunked(pieces: list[bytes]) -> bytes:
        return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)

    tokens = [chunked([b"data: {}\n\n" * 20]) for _ in range(3)]  # a token or so per network read
    burst = chunked([b"x" * 1000] * 200)  # tokens piled up: 200 kB waiting at once
    arrivals = [*tokens, burst, *tokens, b"0\r\n\r\n"]
    asked: list[int] = []

    class SocketReader:  # BufferedReader.read1: at most n bytes of what has arrived
        raw = SimpleNamespace(_sock=None)

        def read1(self, n: int) -> bytes:
            asked.append(n)
            data, arrivals[0] = arrivals[0][:n], arrivals[0][n:]
            if not arrivals[0]:
                arrivals.pop(0)
            return data

    raw = SimpleNamespace(headers={}, release_conn=lambda: None)
    body = b"".join(upstream_body._iter_chunked(raw, SocketReader(), None, None))
    assert len(body) == 3 * 2 * 20 * len(b"data: {}\n\n") + 200 * 1000
    small, big = upstream_body.READ_MIN, upstream_body.READ_MAX
    assert asked[:4] == [small] * 4  # idle tokens, then the burst's first read
    assert asked[4:8] == [2 * small, 4 * small, 8 * small, big] and asked.count(big) >= 2
    assert asked[-3:] == [small] * 3  # back to small reads once the burst is through


@pytest.mark.parametrize("stall", [False, True])
def test_public_reader_fallback_streams_and_stops_the_same(stall, upstream, live, monkeypatch):
    from app.providers import upstream_body

    monkeypatch.setattr(upstream_body, "FAST_READS", False)  # what a future urllib3 would bring
    upstream.reset(Reply(chunks=hostile_chunks(BODIES["openai"](TRICKY_TEXT))))
    url = live(SSE_HEARTBEAT_SECONDS=1)
    assert text_of(open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()) == "".join(TRICKY_TEXT)
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(200)]), delay=0.05,
                         stall_after=5 if stall else None))
    reader = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi")
    reader.until("token")
    reader.close()
    assert upstream.wait_for_request().closed.wait(3), "upstream connection still open"


def test_slow_response_headers_get_heartbeats_and_a_leaving_reader_is_noticed(upstream, live):
    # A model still loading answers its headers late: the reader's thread, which produces a
    # direct stream, waits for them in slices and heartbeats in between.
    upstream.reset(Reply(chunks=BODIES["openai"](["late ", "but ", "whole"]), head_delay=1.5))
    url = live(SSE_HEARTBEAT_SECONDS=0.3)
    reader = open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi")
    events = reader.read_all()
    assert text_of(events) == "late but whole" and events[-1].event == "done"
    assert reader.comments.count("ping") >= 3
    assert events[0].event == "msgid"  # sent before the upstream answered


def test_a_stalled_upstream_heartbeats_and_times_out_under_gevent_too(upstream):
    # gevent's sockets time out in its event loop, not in the kernel: the other idle path.
    upstream.reset(Reply(chunks=BODIES["openai"](["a", "b", "c"]), stall_after=3))
    server = gunicorn(free_port(), {**provider_env(upstream.url), **STALL})
    try:
        assert_heartbeats_then_timeout(server.url, upstream)
    finally:
        server.stop()


def _leave_mid_request(url: str, path: str, body: dict):
    """Send a non-streaming request on a raw socket, then leave before its answer."""
    import json
    import socket

    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), len(payload), payload))
    return sock


NON_STREAMING = [
    ("/v1/chat/completions", {"model": "openai/gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}],
                              "stream": False}),
    ("/api/chat", {"provider": "openai", "prompt": "hi"}),
]


@pytest.mark.parametrize("server", ["werkzeug", "gunicorn"])
@pytest.mark.parametrize("path,body", NON_STREAMING)
def test_a_non_streaming_answer_stops_when_its_client_leaves(server, path, body, upstream, live):
    """`stream: false` and the REST route, socket closed after the request: the answer was
    generated to its end (and paid for) with nobody left to read it."""
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(400)]), delay=0.05))
    settings = {"SSE_HEARTBEAT_SECONDS": "0.5"}
    process = gunicorn(free_port(), {**provider_env(upstream.url), **settings}) if server == "gunicorn" else None
    url = process.url if process else live(**settings)
    try:
        sock = _leave_mid_request(url, path, body)
        seen = upstream.wait_for_request()
        while len(seen.sent) < 5:
            time.sleep(0.02)
        sock.close()
        assert seen.closed.wait(10), "the upstream kept generating after its client left"
        assert len(seen.sent) < 400
    finally:
        if process:
            process.stop()


def test_a_non_streaming_answer_whose_client_stays_is_whole(upstream, live):
    upstream.reset(Reply(chunks=BODIES["openai"]([f"w{i} " for i in range(20)]), delay=0.1))
    url = live(SSE_HEARTBEAT_SECONDS=0.3)
    answer = requests.post(f"{url}/api/chat", json={"provider": "openai", "prompt": "hi"}, timeout=30).json()
    assert answer["content"] == "".join(f"w{i} " for i in range(20)) and answer["finish_reason"] == "stop"
