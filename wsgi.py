"""WSGI entry point: `app` for gunicorn (`wsgi:app`), `application` for mod_wsgi.

Under mod_wsgi the daemon processes do not get your shell's environment, so the vhost
names an env file with `SetEnv LLM_RELAY_ENV_FILE /path/relay.env`. SetEnv reaches the
app only in each request's WSGI environ. When Apache's own environment also names it
(Debian: `export LLM_RELAY_ENV_FILE=…` in /etc/apache2/envvars), the app is built at
import, which the vhost makes happen when each daemon process starts; otherwise on the
first request. Everywhere else it is built at import.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flask import Flask  # noqa: E402

from app import create_app  # noqa: E402


class EnvFileApplication:
    """Builds the Flask app on the first request, with the env file the vhost names."""

    def __init__(self) -> None:
        self._app: Flask | None = None
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = create_app(env_file=environ.get("LLM_RELAY_ENV_FILE"))
        return self._app(environ, start_response)


try:
    import mod_wsgi  # noqa: F401  (importable only inside Apache's mod_wsgi)
except ImportError:
    app: WSGIApplication = create_app()
    application = app
else:
    for backend in ("app.store.sqlite", "app.store.redis"):  # imported lazily elsewhere; here at process start
        importlib.import_module(backend)
    built_on_first_request = EnvFileApplication()
    if os.environ.get("LLM_RELAY_ENV_FILE"):
        built_on_first_request._app = create_app(env_file=os.environ["LLM_RELAY_ENV_FILE"])
    app = application = built_on_first_request
