"""gunicorn settings for development: `gunicorn -c gunicorn.conf.py wsgi:app`.

An SSE stream holds its request open for the whole answer. A sync worker serves one
request at a time, so one open stream would block a whole process; the gevent worker
runs each request (and each upstream producer) as a greenlet, so one process holds
hundreds to thousands of open streams while waiting on sockets costs almost nothing.
"""

import os

bind = os.environ.get("BIND", f"127.0.0.1:{os.environ.get('PORT', '8000')}")
worker_class = "gevent"
# Streams are I/O bound; one process per core is enough, the greenlets do the rest.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Open connections per worker: the cap on concurrent streams a process accepts.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "2000"))
# Not a request timeout under gevent: it only restarts a worker whose loop is stuck.
timeout = 30
# Let running streams finish (or reach a heartbeat) on reload/shutdown.
graceful_timeout = 30
keepalive = 5
# The longest request line (method, URL, version): gunicorn's maximum, Apache's default.
# A prompt sent as a GET query (EventSource) must fit; longer ones belong in a POST, which
# the JS client switches to by itself (/api/capabilities says the limit).
limit_request_line = int(os.environ.get("MAX_URL_BYTES", "8190"))
accesslog = os.environ.get("ACCESS_LOG", "-") or None  # ACCESS_LOG= (empty) turns it off
errorlog = "-"
# Scrubs tokens and keys from every line (access log included); JSON lines with LOG_FORMAT=json.
logger_class = "app.logs.GunicornLogger"


def child_exit(server, worker):
    """A worker is gone: its live gauges (streams open) stop counting in /metrics."""
    from app.metrics import process_exited

    process_exited(worker.pid)
