"""Logs: JSON lines, a request id end to end, and no secret on any line."""

from __future__ import annotations

import json

import requests

from app.logs import Scrubber
from tests.conftest import free_port, open_stream, provider_env
from tests.servers import gunicorn


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_scrubber_removes_configured_and_shaped_secrets():
    scrub = Scrubber(["provider-key-123456", "short"])
    line = ("GET /api/chat/stream?prompt=hi&access_token=abc.def.ghi HTTP/1.1 Authorization: Bearer eyJhbGciOi.x.y "
            "key=provider-key-123456 openai=sk-proj-1234567890abcdef")
    clean = scrub(line)
    for secret in ("abc.def.ghi", "eyJhbGciOi", "provider-key-123456", "1234567890abcdef"):
        assert secret not in clean, clean
    assert "prompt=hi" in clean and "[redacted]" in clean


def test_request_id_from_a_trusted_proxy_reaches_headers_msgid_and_log_lines(make_app, serve, capfd):
    url = serve(make_app(LOG_FORMAT="json", TRUSTED_PROXIES=1))
    reader = open_stream(f"{url}/api/chat/stream?prompt=hi&model=demo-fast", headers={"X-Request-ID": "edge-42.a"})
    events = reader.read_all()
    assert reader.response.headers["X-Request-ID"] == "edge-42.a"
    assert events[0].data["request_id"] == "edge-42.a"
    lines = json_lines(capfd.readouterr().err)
    summary = [entry for entry in lines if "stream" in entry]
    assert summary and summary[-1]["request_id"] == "edge-42.a"
    assert summary[-1]["stream"]["outcome"] == "done" and summary[-1]["stream"]["tokens"] > 0
    assert all({"time", "level", "logger", "message", "request_id"} <= set(entry) for entry in lines)


def test_an_untrusted_request_id_is_replaced(make_app, serve):
    url = serve(make_app())  # TRUSTED_PROXIES=0: anyone could send the header
    response = requests.get(f"{url}/api/capabilities", headers={"X-Request-ID": "forged"}, timeout=10)
    assert response.headers["X-Request-ID"] != "forged" and len(response.headers["X-Request-ID"]) >= 20
    hostile = requests.get(f"{url}/healthz", headers={"X-Request-ID": 'x" injected=1'}, timeout=10)
    assert '"' not in hostile.headers["X-Request-ID"]


def test_refusals_carry_a_request_id(make_app):
    client = make_app(API_TOKENS="alpha-token").test_client()
    response = client.post("/api/chat", json={"prompt": "hi"})
    assert response.status_code == 401 and response.headers["X-Request-ID"]


def test_gunicorn_json_logs_have_request_ids_and_no_tokens(fake_upstream, tmp_path):
    token = "url-token-do-not-log-123"
    server = gunicorn(free_port(), {**provider_env(fake_upstream.url), "LOG_FORMAT": "json", "ACCESS_LOG": "-",
                                    "API_TOKENS": token, "OPENAI_API_KEY": "sk-test-provider-secret-key-42",
                                    "STORE_URL": f"sqlite:///{tmp_path}/relay.sqlite3"})
    try:
        reader = open_stream(f"{server.url}/api/chat/stream?prompt=hi&model=demo-fast&access_token={token}")
        reader.read_all()
        request_id = reader.response.headers["X-Request-ID"]
        requests.post(f"{server.url}/api/chat", json={"prompt": "x"}, timeout=10,
                      headers={"Authorization": "Bearer wrong-token-also-secret"})
    finally:
        server.stop()
    output = server.output()
    assert token not in output and "sk-test-provider-secret-key-42" not in output
    assert "wrong-token-also-secret" not in output
    lines = json_lines(output)
    access = [entry for entry in lines if "access" in entry and entry["access"]["path"] == "/api/chat/stream"]
    assert access and access[0]["request_id"] == request_id and "[redacted]" in access[0]["access"]["query"]
    assert any(entry.get("stream", {}).get("outcome") == "done" and entry["request_id"] == request_id
               for entry in lines)
