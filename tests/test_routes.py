"""Routes: health, page, and the table of bad inputs (clear 4xx JSON, never a 500)."""

import json

import pytest

from app import create_app
from app.config import ConfigError
from tests.conftest import app_config

LONG = "x" * 40_000


BAD_INPUTS = [
    ("GET", "", None, 400, "invalid_request"),
    ("GET", "prompt=", None, 400, "invalid_request"),
    ("GET", "prompt=%20%20", None, 400, "invalid_request"),
    ("GET", f"prompt={LONG}", None, 413, "prompt_too_large"),
    ("GET", "prompt=hi&provider=nope", None, 400, "unknown_provider"),
    ("GET", "prompt=hi&temperature=hot", None, 400, "invalid_request"),
    ("GET", "prompt=hi&temperature=2.5", None, 400, "invalid_request"),
    ("GET", "prompt=hi&temperature=nan", None, 400, "invalid_request"),
    ("GET", "prompt=hi&max_tokens=0", None, 400, "invalid_request"),
    ("GET", "prompt=hi&max_tokens=1.5", None, 400, "invalid_request"),
    ("GET", "prompt=hi&max_tokens=99999999", None, 400, "invalid_request"),
    ("GET", "prompt=hi&conversation_id=../../etc", None, 400, "invalid_request"),
    ("GET", "prompt=hi&model=a%20b", None, 400, "invalid_request"),
    ("GET", "prompt=hi&messages=[]", None, 400, "invalid_request"),
    ("GET", "prompt=hi&bogus=1", None, 400, "invalid_request"),
    ("POST", "", b"{not json", 400, "invalid_json"),
    ("POST", "", b"", 400, "invalid_request"),
    ("POST", "", b"[1, 2]", 400, "invalid_request"),
    ("POST", "", b"\xff\xfe", 400, "invalid_json"),
    ("POST", "", {"prompt": 5}, 400, "invalid_request"),
    ("POST", "", {"prompt": None}, 400, "invalid_request"),
    ("POST", "", {"prompt": ["a"]}, 400, "invalid_request"),
    ("POST", "", {"prompt": "hi", "temperature": "0.5"}, 400, "invalid_request"),
    ("POST", "", {"prompt": "hi", "temperature": True}, 400, "invalid_request"),
    ("POST", "", {"prompt": "hi", "max_tokens": -1}, 400, "invalid_request"),
    ("POST", "", {"prompt": "hi", "provider": 3}, 400, "invalid_request"),
    ("POST", "", {"prompt": "hi", "system": {"a": 1}}, 400, "invalid_request"),
    ("POST", "", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request"),
    ("POST", "", {"messages": "hello"}, 400, "invalid_request"),
    ("POST", "", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request"),
    ("POST", "", {"messages": [{"role": "user", "content": 1}]}, 400, "invalid_request"),
    ("POST", "", {"messages": [{"role": "user", "content": "a", "x": 1}]}, 400, "invalid_request"),
    ("POST", "", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "invalid_request"),
    ("POST", "", {"messages": [{"role": "user", "content": "a"}] * 201}, 413, "prompt_too_large"),
    ("POST", "", {"prompt": "hi", "system": LONG}, 413, "prompt_too_large"),
    ("POST", "", {"prompt": "x" * 20_000, "system": "y" * 20_000}, 413, "prompt_too_large"),
    ("POST", "", {"prompt": "x" * 16_000_000}, 413, "payload_too_large"),  # past the room for images too
]
# GET cases go to the stream route only: the REST route is POST only (test_wrong_method...).
CASES = [("/api/chat/stream", *case) for case in BAD_INPUTS] + [
    ("/api/chat", *case) for case in BAD_INPUTS if case[0] == "POST"]


@pytest.mark.parametrize("route,method,query,body,status,kind", CASES)
def test_bad_input_is_a_clear_4xx(client, route, method, query, body, status, kind):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body)
    response = client.open(f"{route}?{query}", method=method, data=data, content_type="application/json")
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["type"] == kind and error["message"]
    assert "Traceback" not in response.get_data(as_text=True)


def test_provider_without_key_is_refused(make_app):
    client = make_app(OPENAI_API_KEY="").test_client()
    response = client.get("/api/chat/stream?prompt=hi&provider=openai")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "provider_not_configured"


def test_wrong_method_and_unknown_route_are_json(client):
    assert client.get("/api/chat").get_json()["error"]["type"] == "method_not_allowed"
    assert client.get("/api/nothing").get_json()["error"]["type"] == "not_found"


def test_healthz_and_page(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and b"llm-sse-relay" in page.data


def test_rest_returns_the_demo_answer(client):
    response = client.post("/api/chat", json={"prompt": "hi"})
    body = response.get_json()
    assert response.status_code == 200
    assert body["content"].startswith("You asked") and body["finish_reason"] == "stop"
    assert body["usage"]["output_tokens"] > 0 and body["id"] and body["conversation_id"]


def test_bad_configuration_fails_at_startup(upstream):
    with pytest.raises(ConfigError, match="SSE_HEARTBEAT_SECONDS"):
        create_app(app_config(upstream.url, SSE_HEARTBEAT_SECONDS="soon"))
    with pytest.raises(ConfigError):
        create_app(app_config(upstream.url, UPSTREAM_READ_TIMEOUT="0"))


def test_unwritable_store_is_a_clear_startup_error(upstream):
    # What www-data meets under mod_wsgi when STORE_URL points where it cannot write.
    with pytest.raises(ConfigError, match="cannot open the store.*STORE_URL"):
        create_app(app_config(upstream.url, STORE_URL="sqlite:////proc/llm-sse-relay/relay.sqlite3"))


def test_missing_env_file_named_by_the_vhost_is_logged(upstream, caplog, tmp_path):
    create_app(app_config(upstream.url), env_file=str(tmp_path / "relay.env"))
    assert "relay.env (LLM_RELAY_ENV_FILE) is missing or not readable" in caplog.text
    (tmp_path / "relay.env").write_text("export LLM_MODEL='demo-fast'\n# comment\n")
    app = create_app({**app_config(upstream.url)}, env_file=str(tmp_path / "relay.env"))
    assert app.extensions["llm_sse_relay"].settings.LLM_MODEL == "demo-fast"


def test_every_setting_is_documented():
    from dataclasses import fields
    from pathlib import Path

    from app.config import Settings

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    missing = [f.name for f in fields(Settings) if f"`{f.name}`" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_page_has_a_content_security_policy_and_nosniff(client):
    page = client.get("/")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    for response in (page, client.get("/healthz"), client.post("/api/chat", data="x")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
