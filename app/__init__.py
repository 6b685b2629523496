"""llm-sse-relay: stream LLM answers token by token to browsers over Server-Sent Events.

Importing this package imports nothing else. gunicorn's master loads `app.logs` (its
logger class) before gevent patches the workers; had that pulled in requests, urllib3
would keep the unpatched `ssl.SSLContext` and every HTTPS upstream call would fail in the
workers (RecursionError, gevent issue #1016). The app itself is in `app/factory.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None, env_file: str | None = None) -> Flask:
    """The Flask app, configured from `config` over the environment (see app/factory.py)."""
    from app.factory import create_app as build

    return build(config, env_file)
