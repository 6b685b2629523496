"""gunicorn settings for development: `gunicorn -c gunicorn.conf.py wsgi:app`.

An SSE stream holds its request open for the whole answer. A sync worker serves one
request at a time, so one open stream would block a whole process; the gevent worker
runs each request (and each upstream producer) as a greenlet, so one process holds
hundreds to thousands of open streams while waiting on sockets costs almost nothing.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gevent
from gunicorn.workers.ggevent import GeventWorker

bind = os.environ.get("BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
# gunicorn's gevent worker that, on a rolling restart, hands resumable streams to the new
# workers and stays until its answers end (DrainingGeventWorker, below).
worker_class = "gevent"  # replaced by the class below, once it is defined
# Streams are I/O bound; one process per core is enough, the greenlets do the rest.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Open connections per worker: the cap on concurrent streams a process accepts.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "2000"))
# Not a request timeout under gevent: it only restarts a worker whose loop is stuck.
timeout = 30
# On a reload or stop, how long a worker may keep finishing the answers it started: long
# answers take minutes (gunicorn's 30 s would cut them). Ctrl-C (SIGINT) stops at once.
graceful_timeout = int(os.environ.get("DRAIN_SECONDS", "600"))
keepalive = 5
# gunicorn 25.1+ opens a control socket (for `gunicornc`) at one path per user,
# ~/.gunicorn/gunicorn.ctl, removing whatever is there: a second gunicorn of the user took the
# first one's, and stopping either removed the other's. None, unless CONTROL_SOCKET names a
# path for this instance alone. (Older gunicorns ignore both settings.)
control_socket_disable = not os.environ.get("CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["CONTROL_SOCKET"]
# The longest request line (method, URL, version): gunicorn's maximum, Apache's default.
# A prompt sent as a GET query (EventSource) must fit; longer ones belong in a POST, which
# the JS client switches to by itself (/api/capabilities says the limit).
limit_request_line = int(os.environ.get("MAX_URL_BYTES", "8190"))
accesslog = os.environ.get("ACCESS_LOG", "-") or None  # ACCESS_LOG= (empty) turns it off
errorlog = "-"
# Scrubs tokens and keys from every line (access log included); JSON lines with LOG_FORMAT=json.
logger_class = "app.logs.GunicornLogger"

# A health port for load balancers (HEALTH_BIND, e.g. 0.0.0.0:8001; none by default).
# /healthz on the main port is served by the workers' event loops, among the streams: while
# 1,000 streams were being created its slowest answer took seconds (README, benchmark).
# This one is answered by a thread of the master, which serves no requests, so it answers at
# once through any burst; it says whether the workers are serving (see HealthCheck).
health_bind = os.environ.get("HEALTH_BIND", "")


class HealthCheck(BaseHTTPRequestHandler):
    """GET/HEAD /healthz on the health port: 200 when at least one worker is up (it loaded the
    app) and its event loop told the master it was alive within gunicorn's `timeout` (a loop
    notifies every second; the master kills a worker silent longer), else 503."""

    arbiter = None  # the master, set when the port opens
    timeout = 2  # a slow client holds one short-lived thread, never the master's loop

    def do_GET(self):
        if self.path.split("?", 1)[0] != "/healthz":
            self._answer(404, {"error": {"type": "not_found", "message": "only /healthz here"}})
            return
        serving = self._serving_workers()
        status = {"status": "ok" if serving else "unavailable", "workers": serving}
        self._answer(200 if serving else 503, status)

    def do_HEAD(self):
        self.do_GET()

    def _serving_workers(self) -> int:
        arbiter = self.arbiter
        try:
            workers = list(arbiter.WORKERS.values())  # the master's loop may change it meanwhile
        except RuntimeError:
            return 0
        serving = 0
        for worker in workers:
            try:
                if time.monotonic() - worker.tmp.last_update() <= arbiter.timeout:
                    serving += 1
            except (OSError, ValueError):
                pass  # a worker that has just exited
        return serving

    def _answer(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # a probe every few seconds is not worth a log line


_health_server = None


def when_ready(server):
    global _health_server
    if not health_bind:
        return
    host, _, port = health_bind.rpartition(":")
    HealthCheck.arbiter = server
    _health_server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), HealthCheck)
    _health_server.daemon_threads = True
    threading.Thread(target=_health_server.serve_forever, name="health", daemon=True).start()
    server.log.info("health checks: http://%s/healthz", health_bind)


def post_fork(server, worker):
    if _health_server is not None:
        _health_server.socket.close()  # the worker's copy: only the master answers there


class DrainingGeventWorker(GeventWorker):
    """Deploys that lose no answer.

    On a rolling restart (`kill -HUP` of the master, or a new binary with `USR2` then `QUIT`
    of the old master) gunicorn starts new workers and stops the old ones gracefully: they
    stop accepting and finish their requests. An answer is more than its request, though:
    its producer would die with the old process. On that stop this worker
    - tells the readers of its resumable (POST-SSE) streams to go: their responses end
      without a last event, so EventSource (and the JS client) reconnects, lands on a new
      worker and resumes from the store after Last-Event-ID;
    - keeps the process, and so its producers, alive until every answer it started has
      ended and is in the store, for at most DRAIN_SECONDS (graceful_timeout), telling
      the master it is alive meanwhile. An answer whose reader does not resume elsewhere
      stops like any answer whose reader left: after STREAM_GRACE_SECONDS (at least 6 s,
      twice EventSource's reconnect delay) without a reader anywhere.
    Direct streams (/api/chat/stream, WebSocket, OpenAI and AI SDK routes) cannot move:
    they finish on the old worker within the same bound.

    Defined here rather than in the app package so gunicorn's master never imports the
    app (requests, ssl) before gevent patches the workers.
    """

    def run(self):
        watcher = gevent.spawn(self._detach_when_stopping)
        try:
            super().run()  # returns once its requests ended (or graceful_timeout passed)
            self._wait_for_producers()
        finally:
            watcher.kill()

    def _relay(self):
        extensions = getattr(self.wsgi, "extensions", None) or {}
        service = extensions.get("llm_sse_relay")
        return service.relay if service is not None else None

    def _detach_when_stopping(self):
        while self.alive:
            gevent.sleep(0.2)
        relay = self._relay()
        if relay is not None:
            self.log.info("draining: %d resumable stream(s) handed to other workers", relay.detach_readers())

    def _wait_for_producers(self):
        relay = self._relay()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while relay is not None and relay.generations and time.monotonic() < deadline:
            self.notify()  # the master kills a worker that stays silent for `timeout`
            gevent.sleep(0.5)
        if relay is not None and relay.generations:
            self.log.warning("draining: %d answer(s) still running after %s s; stopping them",
                             len(relay.generations), self.cfg.graceful_timeout)


worker_class = DrainingGeventWorker
