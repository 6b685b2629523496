"""llm-sse-relay: stream LLM answers token by token to browsers over Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from app.access import Access, install, parse_rate
from app.config import ConfigError, Settings, environment
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
    try:
        parse_rate(settings.RATE_LIMIT)
        store = open_store(settings.STORE_URL, app.instance_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:  # e.g. www-data cannot write the default SQLite file under mod_wsgi
        where = settings.STORE_URL or f"sqlite in {app.instance_path}"
        raise ConfigError(f"cannot open the store ({where}): {exc}. Set STORE_URL to a SQLite path this "
                          "process can write (sqlite:////var/lib/llm-sse-relay/relay.sqlite3) or to redis://…") from exc
    relay = Relay(settings, build_providers(env, settings), store)
    relay.access = Access(settings, store)
    app.extensions["llm_sse_relay"] = relay
    install(app, relay.access)
    if settings.TRUSTED_PROXIES:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.TRUSTED_PROXIES
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)

    from app import websocket
    from app.routes import bp

    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.MAX_BODY_BYTES}
    app.register_blueprint(bp)
    app.register_blueprint(websocket.bp)
    register_error_handlers(app)
    return app
