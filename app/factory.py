"""The Flask app: settings, store, providers, service, routes, request ids (`create_app`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from app import ai_sdk, logs, messages_api, openai_api, responses_api, websocket
from app.access import install, parse_rate
from app.config import ConfigError, Settings, environment
from app.errors import register_error_handlers
from app.metrics import default_dir
from app.providers import build_providers
from app.relay import new_id
from app.routes import bp
from app.service import ChatService
from app.store import open_store


def create_app(config: Mapping[str, Any] | None = None, env_file: str | None = None) -> Flask:
    """The application factory: `config` (env-style names) overrides the environment."""
    env = environment(config, env_file)
    settings = Settings.load(env)
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT, logs.configured_secrets(env))

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    try:
        parse_rate(settings.RATE_LIMIT)
        openai_api.parse_aliases(settings.MODEL_ALIASES)
        store = open_store(settings.STORE_URL, app.instance_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None  # the message says it all (and has no secret in it)
    except Exception as exc:  # e.g. www-data cannot write the default SQLite file under mod_wsgi
        # Not chained: a client library's own exception may quote the URL, password and all.
        where = settings.STORE_URL or f"sqlite in {app.instance_path}"
        raise ConfigError(f"cannot open the store ({where}): {type(exc).__name__}: {exc}. Set STORE_URL to a "
                          "SQLite path this process can write (sqlite:////var/lib/llm-sse-relay/relay.sqlite3) "
                          "or to redis://…") from None
    providers = build_providers(env, settings)
    if settings.LLM_PROVIDER not in providers:
        raise ConfigError(f"LLM_PROVIDER={settings.LLM_PROVIDER!r} is not available here; known: "
                          f"{', '.join(sorted(providers))} (openai-compatible needs OPENAI_COMPATIBLE_BASE_URL "
                          "or OLLAMA_BASE_URL)")
    try:
        service = ChatService.build(settings, providers, store, settings.METRICS_DIR or default_dir(app.instance_path))
    except ValueError as exc:  # LLM_FALLBACKS naming a provider this server does not have
        raise ConfigError(str(exc)) from exc
    app.extensions["llm_sse_relay"] = service
    _request_ids(app, trusted=settings.TRUSTED_PROXIES > 0)  # first: refusals carry an id too
    install(app, service.access)
    app.after_request(_nosniff)
    if settings.TRUSTED_PROXIES:
        n = settings.TRUSTED_PROXIES
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)

    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.max_body_bytes}
    app.register_blueprint(bp)
    app.register_blueprint(websocket.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(messages_api.bp)
    app.register_blueprint(ai_sdk.bp)
    app.register_blueprint(responses_api.bp)
    register_error_handlers(app)
    return app


def _request_ids(app: Flask, trusted: bool) -> None:
    """Every request has an id (a trusted proxy's X-Request-ID, or a new one): on each log line
    of the request, in the response's X-Request-ID header, and in a stream's msgid event."""

    @app.before_request
    def take_request_id() -> None:
        g.request_id = logs.request_id_from(request.headers, trusted, new_id)
        g.request_id_token = logs.REQUEST_ID.set(g.request_id)

    @app.after_request
    def give_request_id(response: Response) -> Response:
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response

    @app.teardown_request
    def forget_request_id(_exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            logs.REQUEST_ID.reset(token)


def _nosniff(response: Response) -> Response:
    # Browsers must take every body as the type it is served with (JSON stays JSON).
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response
