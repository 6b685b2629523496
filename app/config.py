"""Configuration: environment variables (12-factor), read once into a frozen `Settings`.

`create_app(config)` layers `config` over `os.environ`; a `.env` file (or the file
named by `LLM_RELAY_ENV_FILE`) fills in what the environment does not set. Every
setting, its default and its reason are listed in docs/configuration.md.
"""

from __future__ import annotations

import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from dotenv import dotenv_values

from app.logs import without_userinfo


class ConfigError(ValueError):
    """A configuration value that cannot be used; raised at startup, never per request.

    Its message goes to logs that many can read (Apache's error log, a journal): the user
    and password of any URL in it are removed."""

    def __init__(self, message: str) -> None:
        super().__init__(without_userinfo(message))


@dataclass(frozen=True)
class Settings:
    LLM_PROVIDER: str = "demo"
    LLM_MODEL: str = ""
    # OpenAI-compatible API: names clients may use for provider/model pairs,
    # "fast=groq/llama-3.1-8b-instant,smart=anthropic/claude-sonnet-4-5".
    MODEL_ALIASES: str = ""
    # Failover: provider/model pairs tried in order when the request's provider fails,
    # before or during its answer, "anthropic/claude-sonnet-4-5,openai/gpt-4.1-mini".
    LLM_FALLBACKS: str = ""
    # Models a caller may name beyond each provider's listed ones, its default and the alias
    # targets: "openai/gpt-4.1,anthropic/*" ("*" alone: any name, as before the list existed).
    ALLOWED_MODELS: str = ""
    # The offline demo answers from this server's CPU: offered when it is the default
    # provider, otherwise only when switched on (None = "when LLM_PROVIDER is demo").
    DEMO_ENABLED: bool | None = None
    # Which OpenAI API the `openai` provider speaks: "chat" (chat completions) or "responses"
    # (the Responses API: reasoning summaries, and reasoning kept across tool rounds).
    OPENAI_API: str = "chat"
    # Heartbeat comment cadence: below every common idle timeout (nginx/Apache proxies
    # default to 60 s, many load balancers to 30-60 s) and how fast a departed reader is noticed.
    SSE_HEARTBEAT_SECONDS: float = 15.0
    # A client that stops reading a stream is dropped after this long without progress
    # (gunicorn and the dev server; Apache's own `Timeout` does it there).
    CLIENT_WRITE_TIMEOUT: float = 60.0
    UPSTREAM_CONNECT_TIMEOUT: float = 10.0
    # Silence allowed between upstream bytes before the stream ends with an error;
    # long enough for a reasoning model's pause, short enough not to hang a reader.
    UPSTREAM_READ_TIMEOUT: float = 120.0
    UPSTREAM_MAX_RETRIES: int = 2
    UPSTREAM_RETRY_BASE_SECONDS: float = 0.5
    # A Retry-After longer than this is not waited for (the SDKs give up near 2 min).
    UPSTREAM_RETRY_MAX_WAIT: float = 30.0
    UPSTREAM_POOL_SIZE: int = 256
    # The budget of one request, counted after its route translated it (app/budget.py): the
    # characters of its messages (text, tool calls and results), system text and stop strings...
    MAX_PROMPT_CHARS: int = 32_000
    MAX_BODY_BYTES: int = 1_048_576
    # Images a request may carry (history included): each at most MAX_IMAGE_BYTES decoded
    # (Anthropic's own per-image limit is 5 MB), all together at most MAX_IMAGE_TOTAL_BYTES.
    # A JSON body may be MAX_BODY_BYTES plus the images' base64 (4/3 of their bytes).
    MAX_IMAGES: int = 20
    MAX_IMAGE_BYTES: int = 5_242_880
    MAX_IMAGE_TOTAL_BYTES: int = 10_485_760
    # ...its messages, each tool call and each content part counting as one...
    MAX_MESSAGES: int = 200
    # ...the tools it defines (names, descriptions and parameter schemas as JSON)...
    MAX_TOOL_SCHEMA_CHARS: int = 32_000
    # ...and its ids and names: providers issue call ids of 20-40 characters, and OpenAI,
    # Anthropic and Gemini all cap tool names at 64.
    MAX_TOOL_ID_CHARS: int = 128
    MAX_TOOL_NAME_CHARS: int = 64
    MAX_OUTPUT_TOKENS: int = 128_000
    # The longest request line the server in front accepts (gunicorn.conf.py sets it; Apache's
    # LimitRequestLine and nginx's large_client_header_buffers default to about this). Told to
    # clients in /api/capabilities: a GET (EventSource) prompt longer than this goes by POST.
    MAX_URL_BYTES: int = 8190
    DEMO_TOKENS_PER_SECOND: float = 30.0
    DEMO_FIRST_TOKEN_DELAY: float = 0.25
    STORE_URL: str = ""
    # POST-SSE: after its last reader leaves, a stream keeps generating this long so a
    # reload or a network change can resume it; then it stops (0 = stop at once).
    STREAM_GRACE_SECONDS: float = 30.0
    # A POST-SSE payload that is never opened is forgotten after this long.
    STREAM_TICKET_TTL: float = 300.0
    # How long a finished stream's events stay readable for resume.
    STREAM_LOG_TTL: float = 3600.0
    # History sent back to the model: the most recent messages within both budgets.
    HISTORY_MAX_MESSAGES: int = 50
    HISTORY_MAX_CHARS: int = 24_000
    # A conversation untouched this long is forgotten (30 days).
    CONVERSATION_TTL: float = 2_592_000.0
    # One conversation's size: past either cap a request must start a new conversation
    # (a chat of 500 records is far longer than any history budget replays anyway).
    MAX_CONVERSATION_MESSAGES: int = 500
    MAX_CONVERSATION_BYTES: int = 33_554_432
    # What one caller (token identity, else client address) may keep stored at once, in bytes
    # of conversation records; kept records count until they expire or are deleted (0 = no quota).
    STORAGE_QUOTA_BYTES: int = 67_108_864
    # Tool-calling rounds per request before the model must answer without tools.
    TOOL_MAX_ROUNDS: int = 4
    API_TOKENS: str = ""
    JWT_SECRET: str = ""
    # RS256/ES256: a PEM public key (a file path or the PEM text) or a JWKS file.
    JWT_PUBLIC_KEY: str = ""
    JWT_JWKS_FILE: str = ""
    # Comma-separated; empty = HS256 with a secret, RS256 and ES256 with a key.
    JWT_ALGORITHMS: str = ""
    JWT_AUDIENCE: str = ""
    JWT_ISSUER: str = ""
    # Clock skew allowed between the issuer and this server, in seconds.
    JWT_LEEWAY: float = 30.0
    # A token valid for longer than this (exp - iat, or exp - now) is refused: a leaked
    # token must not be a permanent credential.
    JWT_MAX_LIFETIME: float = 86_400.0
    CORS_ORIGINS: str = ""
    RATE_LIMIT: str = ""
    # Unknown stream ids a client may ask for (GET /api/chat/streams/<id>) per window, counted
    # in each process's memory so that a miss costs no store write; then 429.
    STREAM_LOOKUP_LIMIT: str = "60/minute"
    # Answers in progress at once per caller (token identity, else client address).
    # Behind a reverse proxy set TRUSTED_PROXIES, or every client shares one address.
    MAX_STREAMS_PER_CLIENT: int = 8
    # POST-SSE payloads stored but not yet opened, per caller: what step 1 can pile up.
    MAX_TICKETS_PER_CLIENT: int = 16
    # Open responses reading POST-SSE streams (resumes, other tabs) per caller: each holds a
    # server thread (a mod_wsgi stream thread), so one stream id opened again and again
    # must not take them all.
    MAX_READERS_PER_CLIENT: int = 16
    # Proxies in front of the app whose X-Forwarded-* headers are trusted (gunicorn
    # behind Apache/nginx: 1); 0 under mod_wsgi, where REMOTE_ADDR is the client.
    TRUSTED_PROXIES: int = 0
    # An IPv6 caller without credentials is its /64: one host (one home or phone network)
    # is given a whole /64 and can take a new address in it for every request (128: each address).
    IPV6_CLIENT_PREFIX: int = 64
    LOG_LEVEL: str = "INFO"
    # "text" for people, "json" (one object a line) for log shippers.
    LOG_FORMAT: str = "text"
    # /metrics: its own bearer token (for a Prometheus that has no API token); empty = like the API.
    METRICS_TOKEN: str = ""
    # Where the processes of one server share their metrics (empty: a directory in the temp dir).
    METRICS_DIR: str = ""

    @classmethod
    def load(cls, env: Mapping[str, Any]) -> Settings:
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.name)
            if raw is None or raw == "":
                continue
            values[f.name] = coerce(f.name, raw, hints[f.name])
        settings = cls(**values)
        for name in ("SSE_HEARTBEAT_SECONDS", "CLIENT_WRITE_TIMEOUT", "UPSTREAM_CONNECT_TIMEOUT",
                     "UPSTREAM_READ_TIMEOUT",
                     "MAX_PROMPT_CHARS", "MAX_BODY_BYTES", "MAX_MESSAGES", "MAX_OUTPUT_TOKENS",
                     "MAX_CONVERSATION_MESSAGES", "MAX_CONVERSATION_BYTES", "JWT_MAX_LIFETIME", "MAX_IMAGE_BYTES",
                     "MAX_IMAGE_TOTAL_BYTES", "MAX_TOOL_SCHEMA_CHARS", "MAX_TOOL_ID_CHARS", "MAX_TOOL_NAME_CHARS"):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if settings.LOG_FORMAT not in ("text", "json"):
            raise ConfigError("LOG_FORMAT must be text or json")
        if settings.OPENAI_API not in ("chat", "responses"):
            raise ConfigError("OPENAI_API must be chat or responses")
        if settings.MAX_IMAGES < 0:
            raise ConfigError("MAX_IMAGES must not be negative")
        for name in ("MAX_STREAMS_PER_CLIENT", "MAX_TICKETS_PER_CLIENT", "MAX_READERS_PER_CLIENT", "TRUSTED_PROXIES",
                     "JWT_LEEWAY", "TOOL_MAX_ROUNDS", "UPSTREAM_MAX_RETRIES", "STORAGE_QUOTA_BYTES"):
            if getattr(settings, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if not 1 <= settings.IPV6_CLIENT_PREFIX <= 128:
            raise ConfigError("IPV6_CLIENT_PREFIX must be between 1 and 128")
        return settings

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: the text limit plus room for the images' base64."""
        return self.MAX_BODY_BYTES + (self.MAX_IMAGE_TOTAL_BYTES * 4 // 3 if self.MAX_IMAGES else 0)

    @property
    def demo_enabled(self) -> bool:
        return self.LLM_PROVIDER == "demo" if self.DEMO_ENABLED is None else self.DEMO_ENABLED


TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


def coerce(name: str, raw: Any, kind: Any) -> Any:
    """`raw` (a string from the environment, or a value from `config`) as the field's type."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))  # Optional[X]: X
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    if kind is bool:
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def read_env_file(path: str) -> dict[str, str]:
    """The `KEY=value` lines of a .env file, as python-dotenv reads them (quotes, escapes,
    `export`, inline comments); an absent or unreadable file gives nothing."""
    try:
        return {k: v for k, v in dotenv_values(path, encoding="utf-8").items() if v is not None}
    except (OSError, UnicodeDecodeError):  # environment() warns when it was named explicitly
        return {}


def environment(config: Mapping[str, Any] | None = None, env_file: str | None = None) -> dict[str, Any]:
    """The effective environment: env file < process environment < explicit config."""
    named = env_file or os.environ.get("LLM_RELAY_ENV_FILE")
    path = named or ".env"
    if named and not os.access(named, os.R_OK):
        # Under mod_wsgi this is the only way keys arrive: say so instead of "no API key".
        logging.getLogger("llm_sse_relay").warning(
            "env file %s (LLM_RELAY_ENV_FILE) is missing or not readable by this process; "
            "provider keys and settings in it are not loaded", named)
    merged: dict[str, Any] = dict(read_env_file(path)) if os.path.isfile(path) else {}
    merged.update(os.environ)
    merged.update(config or {})
    return merged
