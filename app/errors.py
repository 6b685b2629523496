"""The one error shape of the API, `{"error": {"type", "message"}}`, produced here only."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import Flask, Response, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from app.store.base import StoreError

if TYPE_CHECKING:
    from app.metrics import Metrics
    from app.providers.domain import ProviderError

log = logging.getLogger("llm_sse_relay")

HTTP_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
              429: "rate_limited", 414: "uri_too_long", 431: "headers_too_large"}


class ApiError(Exception):
    """A request the API refuses, with its status and a message meant for the caller."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}


# The OpenAI-compatible routes answer errors in OpenAI's shape, which its SDKs turn into
# their exception classes (by status) with the message (docs/openai-api.md).
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error"}


# The Anthropic Messages route answers in Anthropic's shape and statuses; its SDKs pick their
# exception class by status (docs/anthropic-api.md). Other 4xx are invalid_request_error, as
# Anthropic documents.
ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                   529: "overloaded_error"}
ANTHROPIC_PATHS = ("/v1/messages",)


def anthropic_error_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def store_busy(err: StoreError, metrics: Metrics | None) -> ApiError:
    """The one refusal for a store that cannot answer now (locked, unreachable, full), on
    every transport: logged with its cause, counted, answered in our words."""
    log.warning("store unavailable: %s", err)
    if metrics is not None:
        metrics.store_failed()
    return ApiError(503, "store_unavailable", "the server's store is busy; try again shortly", {"Retry-After": "2"})


def provider_refusal(err: ProviderError) -> ApiError:
    """A non-streamed answer that failed upstream, as the refusal the caller gets. The one
    mapping of provider failures to HTTP statuses: the provider's refusal of the request
    keeps its 4xx; its failures, and its refusal of this server's own key (the operator's
    problem, not the caller's), are 502. On the Anthropic route the statuses are Anthropic's
    (its SDKs pick their exception class by status). The message is ours (ProviderError)."""
    if has_request_context() and request.path in ANTHROPIC_PATHS:
        # Imported here: app.protocols takes its error types from this module.
        from app.protocols import anthropic_failure

        status, message = anthropic_failure(err.as_event())
        retry = err.retry_after if status == 429 else None
        return ApiError(status, err.type, message, {"Retry-After": str(max(1, round(retry)))} if retry else None)
    status = err.status if err.status is not None and 400 <= err.status < 500 else 502
    return ApiError(502 if status in (401, 403) else status, err.type, err.message)


def error_response(status: int, type: str, message: str, headers: dict[str, str] | None = None,
                   upstream_status: int | None = None) -> Response:
    if has_request_context() and request.path in ANTHROPIC_PATHS:
        response = jsonify({"type": "error", "error": {"type": anthropic_error_type(status), "message": message},
                            "request_id": g.get("request_id")})
    elif has_request_context() and request.path.startswith("/v1/"):
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        response = jsonify({"error": {"message": message, "type": kind, "param": None, "code": type}})
    else:
        error: dict[str, object] = {"type": type, "message": message}
        if upstream_status is not None:
            error["status"] = upstream_status
        response = jsonify({"error": error})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask, metrics: Metrics | None = None) -> None:
    # Imported here, not at the top: the providers package loads every adapter, and adapters
    # use modules (app.images) that take ApiError from this one.
    from app.providers.domain import ProviderError

    @app.errorhandler(ApiError)
    def api_error(err: ApiError) -> Response:
        return error_response(err.status, err.type, err.message, err.headers)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        status = err.code or 500
        message = err.description or err.name
        if status == 413:
            message = f"request body is larger than {app.config.get('MAX_CONTENT_LENGTH')} bytes"
        return error_response(status, HTTP_TYPES.get(status, "http_error"), message)

    @app.errorhandler(ProviderError)
    def provider_failed(err: ProviderError) -> Response:
        refusal = provider_refusal(err)
        return error_response(refusal.status, refusal.type, refusal.message, refusal.headers,
                              upstream_status=err.status)

    @app.errorhandler(StoreError)
    def store_unavailable(err: StoreError) -> Response:
        refusal = store_busy(err, metrics)
        return error_response(refusal.status, refusal.type, refusal.message, refusal.headers)

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> Response:
        # Logged with its traceback here; the caller only learns that it failed.
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server failed to handle this request")
