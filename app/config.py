"""Configuration: environment variables (12-factor), read once into a frozen `Settings`.

`create_app(config)` layers `config` over `os.environ`; a `.env` file (or the file
named by `LLM_RELAY_ENV_FILE`) fills in what the environment does not set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used; raised at startup, never per request."""


@dataclass(frozen=True)
class Settings:
    LLM_PROVIDER: str = "demo"
    LLM_MODEL: str = ""
    # Heartbeat comment cadence: below every common idle timeout (nginx/Apache proxies
    # default to 60 s, many load balancers to 30-60 s) and how fast a departed reader is noticed.
    SSE_HEARTBEAT_SECONDS: float = 15.0
    UPSTREAM_CONNECT_TIMEOUT: float = 10.0
    # Silence allowed between upstream bytes before the stream ends with an error;
    # long enough for a reasoning model's pause, short enough not to hang a reader.
    UPSTREAM_READ_TIMEOUT: float = 120.0
    UPSTREAM_MAX_RETRIES: int = 2
    UPSTREAM_RETRY_BASE_SECONDS: float = 0.5
    # A Retry-After longer than this is not waited for (the SDKs give up near 2 min).
    UPSTREAM_RETRY_MAX_WAIT: float = 30.0
    UPSTREAM_POOL_SIZE: int = 256
    MAX_PROMPT_CHARS: int = 32_000
    MAX_BODY_BYTES: int = 1_048_576
    MAX_MESSAGES: int = 200
    MAX_OUTPUT_TOKENS: int = 128_000
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
    # Tool-calling rounds per request before the model must answer without tools.
    TOOL_MAX_ROUNDS: int = 4
    API_TOKENS: str = ""
    JWT_SECRET: str = ""
    JWT_AUDIENCE: str = ""
    CORS_ORIGINS: str = ""
    RATE_LIMIT: str = ""
    # Answers in progress at once per caller (0 = no cap, the default: behind a reverse
    # proxy every client has the proxy's address unless TRUSTED_PROXIES is set).
    MAX_STREAMS_PER_CLIENT: int = 0
    # Proxies in front of the app whose X-Forwarded-* headers are trusted (gunicorn
    # behind Apache/nginx: 1); 0 under mod_wsgi, where REMOTE_ADDR is the client.
    TRUSTED_PROXIES: int = 0
    LOG_LEVEL: str = "INFO"

    @classmethod
    def load(cls, env: Mapping[str, Any]) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.name)
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{f.name}={raw!r} is not a valid {kind.__name__}") from exc
        settings = cls(**values)
        for name in ("SSE_HEARTBEAT_SECONDS", "UPSTREAM_CONNECT_TIMEOUT", "UPSTREAM_READ_TIMEOUT",
                     "MAX_PROMPT_CHARS", "MAX_BODY_BYTES", "MAX_MESSAGES", "MAX_OUTPUT_TOKENS"):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        return settings


def read_env_file(path: str) -> dict[str, str]:
    """`KEY=value` lines (optional `export`, quotes, `#` comments), as .env files have them."""
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:  # absent or unreadable: environment() warns when it was named explicitly
        return values
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def environment(config: Mapping[str, Any] | None = None, env_file: str | None = None) -> dict[str, Any]:
    """The effective environment: env file < process environment < explicit config."""
    named = env_file or os.environ.get("LLM_RELAY_ENV_FILE")
    path = named or ".env"
    if named and not os.access(named, os.R_OK):
        # Under mod_wsgi this is the only way keys arrive: say so instead of "no API key".
        logging.getLogger("llm_sse_relay").warning(
            "env file %s (LLM_RELAY_ENV_FILE) is missing or not readable by this process; "
            "provider keys and settings in it are not loaded", named)
    merged: dict[str, Any] = dict(read_env_file(path))
    merged.update(os.environ)
    merged.update(config or {})
    return merged
