"""Auth (bearer tokens; JWTs in test_jwt.py), the open-stream cap, rate limits and CORS."""

import time

import pytest
import requests

from app.config import ConfigError
from tests.conftest import open_stream, text_of
from tests.fake_upstream import BODIES, Reply

DEMO = {"prompt": "hi", "model": "demo-fast"}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_bearer_tokens_guard_every_api_route(make_app):
    client = make_app(API_TOKENS="alpha,beta").test_client()
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    assert client.get("/api/capabilities").get_json()["auth"] is True
    for method, path in [("post", "/api/chat"), ("post", "/api/chat/stream"), ("post", "/api/chat/streams"),
                         ("get", "/api/conversations/abc"), ("delete", "/api/chat/streams/abc")]:
        response = getattr(client, method)(path, json=DEMO)
        assert response.status_code == 401, path
        assert response.get_json()["error"]["type"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.post("/api/chat", json=DEMO, headers=bearer("gamma")).status_code == 401
    assert client.post("/api/chat", json=DEMO, headers=bearer("beta")).status_code == 200


def test_post_sse_with_auth_is_bound_to_its_creator(make_app, serve, upstream):
    url = serve(make_app(API_TOKENS="alpha,beta", STREAM_GRACE_SECONDS=0))
    upstream.reset(Reply(chunks=BODIES["openai"]([f"{i} " for i in range(200)]), delay=0.02))
    ticket = requests.post(f"{url}/api/chat/streams", json={"provider": "openai", "prompt": "hi"},
                           headers=bearer("alpha"), timeout=10).json()
    stream_url = url + ticket["stream_url"]
    # Another client holding the id cannot open or stop it with its own token.
    assert requests.get(stream_url, headers=bearer("beta"), timeout=10).status_code == 403
    reader = open_stream(stream_url)  # EventSource: no headers, the id is the credential
    next(iter(reader))
    assert requests.delete(stream_url, headers=bearer("beta"), timeout=10).status_code == 403
    assert requests.delete(stream_url, timeout=10).status_code == 401
    assert requests.delete(stream_url, headers=bearer("alpha"), timeout=10).json()["status"] == "stopped"
    last = reader.read_all()[-1]
    assert last.event == "done" and last.data["finish_reason"] == "stopped", last


def test_direct_eventsource_stream_may_carry_the_token_in_the_url(make_app, serve):
    url = serve(make_app(API_TOKENS="alpha"))
    assert requests.get(f"{url}/api/chat/stream?prompt=hi", timeout=10).status_code == 401
    events = open_stream(f"{url}/api/chat/stream?prompt=hi&model=demo-fast&access_token=alpha").read_all()
    assert events[-1].event == "done"


def test_rate_limit_answers_429_with_retry_after(make_app):
    client = make_app(RATE_LIMIT="2/minute").test_client()
    assert [client.post("/api/chat", json=DEMO).status_code for _ in range(2)] == [200, 200]
    response = client.post("/api/chat", json=DEMO)
    assert response.status_code == 429 and response.get_json()["error"]["type"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert client.get("/healthz").status_code == 200  # health checks are never limited


def test_rate_limits_are_per_token(make_app):
    client = make_app(RATE_LIMIT="1/minute", API_TOKENS="alpha,beta").test_client()
    assert client.post("/api/chat", json=DEMO, headers=bearer("alpha")).status_code == 200
    assert client.post("/api/chat", json=DEMO, headers=bearer("alpha")).status_code == 429
    assert client.post("/api/chat", json=DEMO, headers=bearer("beta")).status_code == 200


def test_cap_on_concurrent_open_streams(make_app, serve, upstream):
    url = serve(make_app(MAX_STREAMS_PER_CLIENT=2))
    upstream.reset(Reply(chunks=BODIES["openai"](["a"]), stall_after=3))
    readers = [open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi") for _ in range(2)]
    third = requests.get(f"{url}/api/chat/stream?provider=openai&prompt=hi", timeout=10)
    assert third.status_code == 429 and third.json()["error"]["type"] == "too_many_streams"
    readers[0].close()
    assert upstream.wait_for_request(1).closed.wait(3)
    time.sleep(0.2)
    upstream.reset(Reply(chunks=BODIES["openai"](["ok"])))
    assert text_of(open_stream(f"{url}/api/chat/stream?provider=openai&prompt=hi").read_all()) == "ok"
    readers[1].close()


def test_cors_allowed_origin_and_preflight(make_app):
    client = make_app(CORS_ORIGINS="https://app.example, https://other.example").test_client()
    preflight = client.options("/api/chat/streams", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "Origin" in preflight.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    actual = client.post("/api/chat", json=DEMO, headers={"Origin": "https://other.example"})
    assert actual.headers["Access-Control-Allow-Origin"] == "https://other.example"
    denied = client.post("/api/chat", json=DEMO, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in denied.headers


def test_cors_wildcard_never_with_credentials(make_app):
    client = make_app(CORS_ORIGINS="*").test_client()
    response = client.post("/api/chat", json=DEMO, headers={"Origin": "https://any.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers


def from_address(client, address: str, path: str = "/api/chat"):
    return client.post(path, json=DEMO, environ_base={"REMOTE_ADDR": address})


def test_ipv6_callers_are_counted_by_their_64_prefix(make_app):
    """Attack (issue 20): a host owns a whole /64 and picks a fresh address for each request;
    counted per address, every one of them got a rate limit and stream caps of its own."""
    client = make_app(RATE_LIMIT="2/minute").test_client()
    assert from_address(client, "2001:db8:1:2::1").status_code == 200
    assert from_address(client, "2001:db8:1:2:aaaa:bbbb:cccc:dddd").status_code == 200
    refused = from_address(client, "2001:db8:1:2::3")
    assert refused.status_code == 429 and refused.get_json()["error"]["type"] == "rate_limited"
    assert from_address(client, "2001:db8:1:3::1").status_code == 200  # the next /64 is another client
    # IPv4 addresses, also written as IPv4-mapped IPv6 (a dual-stack socket), count one by one.
    assert [from_address(client, "192.0.2.7").status_code for _ in range(2)] == [200, 200]
    assert from_address(client, "::ffff:192.0.2.7").status_code == 429
    assert from_address(client, "::ffff:192.0.2.8").status_code == 200


def test_ipv6_client_prefix_is_a_setting(make_app):
    per_address = make_app(RATE_LIMIT="1/minute", IPV6_CLIENT_PREFIX=128).test_client()
    assert from_address(per_address, "2001:db8::1").status_code == 200
    assert from_address(per_address, "2001:db8::2").status_code == 200
    per_48 = make_app(RATE_LIMIT="1/minute", IPV6_CLIENT_PREFIX=48).test_client()
    assert from_address(per_48, "2001:db8:1:2::1").status_code == 200
    assert from_address(per_48, "2001:db8:1:3::1").status_code == 429
    for bad in ("-1", "129", "x"):
        with pytest.raises(ConfigError):
            make_app(IPV6_CLIENT_PREFIX=bad)


def test_slots_are_given_back_by_their_context_managers():
    """A slot taken for a block is given back when the block ends, however it ends; one handed
    on (`ExitStack.pop_all`) only when its new owner closes it; a ticket stays held once stored."""
    from contextlib import ExitStack

    from app.access import Access
    from app.config import Settings
    from app.errors import ApiError
    from app.store import MemoryStore

    access = Access(Settings.load({"MAX_STREAMS_PER_CLIENT": "1", "MAX_READERS_PER_CLIENT": "1",
                                   "MAX_TICKETS_PER_CLIENT": "1"}), MemoryStore(), on_refusal=lambda reason: None)

    def refused(take) -> bool:
        try:
            with take():
                return False
        except ApiError as err:
            return err.status == 429

    with pytest.raises(RuntimeError):
        with access.stream_slot("alice", "s1"):
            assert refused(lambda: access.stream_slot("alice", "s2"))
            raise RuntimeError("the block fails")
    assert not refused(lambda: access.stream_slot("alice", "s3"))
    with ExitStack() as block:
        block.enter_context(access.reader_slot("alice", "r1"))
        handed_on = block.pop_all()
    assert refused(lambda: access.reader_slot("alice", "r2"))
    handed_on.close()
    assert not refused(lambda: access.reader_slot("alice", "r3"))
    with pytest.raises(RuntimeError):
        with access.held_ticket("alice", "t1", 60):
            raise RuntimeError("not stored")
    with access.held_ticket("alice", "t2", 60):
        pass  # stored: held until opened
    assert refused(lambda: access.held_ticket("alice", "t3", 60))
    access.release_ticket("alice", "t2")
    assert not refused(lambda: access.held_ticket("alice", "t4", 60))
