"""CPU to set up one stream, in one thread: the app called as a WSGI server calls it (an
environ built once per kind of request and copied, as mod_wsgi builds one in C) against
`bench/upstream.py` (one token per stream, as fast as it can), a SQLite store in a temporary
directory, and the settings `bench/run.py` gives the relay. No sockets between client and app,
no GIL handoffs: what is left is the Python the relay runs per stream (and the upstream call).
`--test-client` goes through Flask's test client instead (which adds ~100 µs a request of its own).

    python -m bench.setup_profile                      # both ways in, 300 streams x 5 rounds
    python -m bench.setup_profile --mode postsse --profile 30   # cProfile, top 30 by own time

Each round runs `--streams` streams of each mode (alternated) and reports `time.process_time`
per stream (every thread of this process: the log flusher's writes count too); the medians
of the rounds are printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# postsse: the ticket POST and its stream GET; direct: GET /api/chat/stream; ticket: the POST
# alone (what Apache's relay-app serves); open: the stream GET alone (relay-sse), of tickets
# made before the clock starts.
MODES = ("postsse", "direct", "ticket", "open")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "bench/upstream.py", "--port", str(port), "--rate", "0",
                             "--tokens", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # its "listening" line
    return proc, f"http://127.0.0.1:{port}"


def build_client(upstream_url: str, workdir: str, test_client: bool = False):
    from app.factory import create_app

    config = {"OPENAI_API_KEY": "bench", "OPENAI_BASE_URL": upstream_url, "LOG_LEVEL": "WARNING",
              "UPSTREAM_POOL_SIZE": "4096", "MAX_STREAMS_PER_CLIENT": "0", "MAX_TICKETS_PER_CLIENT": "0",
              "MAX_READERS_PER_CLIENT": "0", "STORAGE_QUOTA_BYTES": "0", "STREAM_GRACE_SECONDS": "0",
              "STORE_URL": f"sqlite:///{workdir}/relay.sqlite3", "METRICS_DIR": f"{workdir}/metrics"}
    os.makedirs(f"{workdir}/metrics", exist_ok=True)
    app = create_app(config)
    return app, TestClient(app) if test_client else WsgiClient(app)


class WsgiClient:
    """Requests as a WSGI server makes them: a copy of a prepared environ, the body iterated and
    closed. Only what the bench sends: the ticket POST, its stream GET, the direct GET."""

    def __init__(self, app) -> None:
        from werkzeug.test import EnvironBuilder

        self.app = app
        self.body = json.dumps({"provider": "openai", "prompt": "bench"}).encode()
        headers = {"Host": "127.0.0.1", "User-Agent": "bench"}
        self.post_env = EnvironBuilder(path="/api/chat/streams", method="POST", data=self.body, headers=headers,
                                       content_type="application/json").get_environ()
        self.get_env = EnvironBuilder(path="/api/chat/stream", query_string="provider=openai&prompt=bench",
                                      headers=headers).get_environ()
        self.open_env = EnvironBuilder(path="/api/chat/streams/x", headers=headers).get_environ()

    def call(self, environ: dict) -> tuple[str, bytes]:
        status: list[str] = []

        def start_response(code, headers, exc_info=None):
            status.append(code)
            return lambda data: None

        result = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return status[0], body

    def ticket(self) -> str:
        environ = dict(self.post_env, **{"wsgi.input": io.BytesIO(self.body)})
        status, body = self.call(environ)
        assert status.startswith("201"), body
        url: str = json.loads(body)["stream_url"]
        return url

    def open(self, url: str) -> bytes:
        return self.call(dict(self.open_env, PATH_INFO=url, **{"wsgi.input": io.BytesIO()}))[1]

    def stream(self, mode: str) -> bytes:
        if mode == "postsse":
            return self.open(self.ticket())
        else:
            environ = dict(self.get_env)
        environ["wsgi.input"] = io.BytesIO()
        return self.call(environ)[1]


class TestClient(WsgiClient):
    """The same requests through Flask's test client."""

    def __init__(self, app) -> None:
        self.client = app.test_client()

    def ticket(self) -> str:
        response = self.client.post("/api/chat/streams", json={"provider": "openai", "prompt": "bench"})
        assert response.status_code == 201, response.get_data(as_text=True)
        url: str = response.get_json()["stream_url"]
        return url

    def open(self, url: str) -> bytes:
        return self.client.get(url).get_data()

    def stream(self, mode: str) -> bytes:
        if mode == "postsse":
            return self.open(self.ticket())
        return self.client.get("/api/chat/stream?provider=openai&prompt=bench").get_data()


def one_stream(client: WsgiClient, mode: str, ticket: str | None = None) -> None:
    if mode == "ticket":
        client.ticket()
        return
    body = client.open(ticket) if mode == "open" and ticket else client.stream(mode)
    assert b"event: done" in body, body[-300:]


def settle(app) -> None:
    """Wait for what the streams write after their readers have it all (the log flusher)."""
    from app.routes import EXTENSION

    relay = app.extensions[EXTENSION].relay
    deadline = time.monotonic() + 30
    while (relay.generations or relay.flusher.active) and time.monotonic() < deadline:
        time.sleep(0.005)


def cpu_per_stream(app, client, mode: str, streams: int) -> float:
    tickets = [client.ticket() if mode == "open" else None for _ in range(streams)]
    settle(app)
    start = time.process_time()
    for ticket in tickets:
        one_stream(client, mode, ticket)
    settle(app)
    return (time.process_time() - start) / streams * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="postsse,direct", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="profile --streams streams of --mode with cProfile instead; print the TOP functions")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--test-client", action="store_true", help="through Flask's test client")
    args = parser.parse_args()
    modes = tuple(args.mode.split(","))
    upstream, url = start_upstream()
    try:
        with tempfile.TemporaryDirectory() as workdir:
            app, client = build_client(url, workdir, args.test_client)
            for mode in modes:  # warm up: imports, connections, prepared requests
                cpu_per_stream(app, client, mode, 30)
            settle(app)
            if args.profile:
                for mode in modes:
                    tickets = [client.ticket() if mode == "open" else None for _ in range(args.streams)]
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for ticket in tickets:
                        one_stream(client, mode, ticket)
                    profiler.disable()
                    out = io.StringIO()
                    stats = pstats.Stats(profiler, stream=out)
                    stats.sort_stats(args.sort).print_stats(args.profile)
                    print(f"== {mode}, {args.streams} streams\n{out.getvalue()}")
                return
            runs: dict[str, list[float]] = {mode: [] for mode in modes}
            for round_ in range(args.rounds):
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    runs[mode].append(cpu_per_stream(app, client, mode, args.streams))
                print("  ".join(f"{m} {runs[m][-1]:.0f}" for m in modes), "µs/stream", flush=True)
            print("median  " + "  ".join(f"{m} {statistics.median(runs[m]):.0f}" for m in modes) + " µs/stream")
    finally:
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    main()
