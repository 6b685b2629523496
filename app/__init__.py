"""llm-sse-relay: stream LLM answers token by token to browsers over Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from app.config import Settings, environment
from app.errors import register_error_handlers
from app.providers import build_providers
from app.relay import Relay
from app.store import open_store


def create_app(config: Mapping[str, Any] | None = None, env_file: str | None = None) -> Flask:
    """The application factory: `config` (env-style names) overrides the environment."""
    env = environment(config, env_file)
    settings = Settings.load(env)
    logging.basicConfig(level=settings.LOG_LEVEL.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_BODY_BYTES
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    store = open_store(settings.STORE_URL, app.instance_path)
    app.extensions["llm_sse_relay"] = Relay(settings, build_providers(env, settings), store)

    from app import websocket
    from app.routes import bp

    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.MAX_BODY_BYTES}
    app.register_blueprint(bp)
    app.register_blueprint(websocket.bp)
    register_error_handlers(app)
    return app
