"""The Flask app: settings, store, providers, service, routes, request ids (`create_app`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from app import ai_sdk, logs, messages_api, openai_api, responses_api, routes, websocket
from app.access import Access, guard, guard_metrics, parse_rate
from app.config import ConfigError, Settings, environment
from app.errors import register_error_handlers
from app.metrics import default_dir
from app.providers import build_providers
from app.relay import new_id
from app.service import ChatService
from app.store import open_store


def create_app(config: Mapping[str, Any] | None = None, env_file: str | None = None) -> Flask:
    """The application factory: `config` (env-style names) overrides the environment."""
    app = Flask(__name__)
    init_app(app, config, env_file)
    return app


def init_app(app: Flask, config: Mapping[str, Any] | None = None, env_file: str | None = None) -> ChatService:
    """Serve the relay from `app`, a new one (`create_app`) or an existing application's: its
    settings read once and checked (`ConfigError` says what is wrong), the store (by default a
    SQLite file in the app's instance folder), providers and the `ChatService` built once, the
    routes with their access rules, error handlers and request ids. The service is
    `app.extensions["llm_sse_relay"]`, where the routes and the Python API find it."""
    env = environment(config, env_file)
    settings = Settings.load(env)
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT, logs.configured_secrets(env))

    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # Flask's DefaultJSONProvider has them
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
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
    app.extensions[routes.EXTENSION] = service
    _request_ids(app, trusted=settings.TRUSTED_PROXIES > 0)  # first: refusals carry an id too
    app.after_request(_nosniff)
    if settings.TRUSTED_PROXIES:
        n = settings.TRUSTED_PROXIES
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]

    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": settings.max_body_bytes}
    _routes(app, service.access, settings.METRICS_TOKEN)
    register_error_handlers(app, service.metrics)
    return service


def _routes(app: Flask, access: Access, metrics_token: str) -> None:
    """Every blueprint, with the access rules of its routes (app.access.guard)."""
    app.register_blueprint(routes.pages)  # the page and the health check: open to all
    app.register_blueprint(routes.offer)
    guard(app, routes.offer, access, origin=False, identity=None)  # what the server offers, to any page
    app.register_blueprint(routes.metrics_bp)
    guard_metrics(app, routes.metrics_bp, access, metrics_token)
    for blueprint in (routes.api, openai_api.bp, ai_sdk.bp, responses_api.bp):
        app.register_blueprint(blueprint)
        guard(app, blueprint, access)
    app.register_blueprint(messages_api.bp)
    guard(app, messages_api.bp, access, api_key_header=True)
    app.register_blueprint(routes.stream_urls)
    guard(app, routes.stream_urls, access, identity="optional")
    app.register_blueprint(websocket.bp)
    # Browsers cannot set headers on a WebSocket: its first message carries the token.
    guard(app, websocket.bp, access, identity=None)


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
