"""Logs a person or a machine can read: text or JSON lines (`LOG_FORMAT`), a request id on
every line of a request, and no secrets on any line.

The request id comes from `X-Request-ID` when a trusted proxy sends one (`TRUSTED_PROXIES`;
the proxy must set it, never pass the client's on, as apache/nginx.conf and
apache/proxy-gunicorn.conf do), else it is made here; it is returned in the response's
`X-Request-ID` header and in the stream's `msgid` event, and it follows the answer into its
producer thread, so the stream's summary line carries it too. Provider keys, tokens,
`access_token` query parameters and the passwords of URLs are
scrubbed from every line, gunicorn's access log included.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from werkzeug.datastructures import Headers

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# What a client may send as a request id: short, no spaces or quotes that would break a log line.
REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The user and password of a URL (redis://:password@host, http://user:pass@proxy).
URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
# Secrets by shape, whatever the configuration: tokens in URLs and headers, provider keys.
PATTERNS = [
    (URL_USERINFO, r"\1[redacted]@"),
    (re.compile(r"(access_token=)[^&\s\"']+"), r"\1[redacted]"),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE), r"\1[redacted]"),
    (re.compile(r"\b(sk-[A-Za-z0-9_-]{8})[A-Za-z0-9_-]+"), r"\1[redacted]"),
]
HANDLER_NAME = "llm-sse-relay"
SECRET_SETTINGS = ("API_TOKENS", "JWT_SECRET", "METRICS_TOKEN")


def configured_secrets(env: Mapping[str, Any]) -> list[str]:
    """Values that must never reach a log: provider keys, the relay's own tokens, and the
    passwords of URLs in settings (STORE_URL's Redis password), wherever they show up alone."""
    values = [str(v) for k, v in env.items() if k.endswith("_API_KEY") and v]
    for name in SECRET_SETTINGS:
        values += [part.strip() for part in str(env.get(name) or "").split(",")]
    for value in env.values():
        if isinstance(value, str) and "@" in value and "://" in value:
            try:
                values.append(urlsplit(value.strip()).password or "")
            except ValueError:
                pass
    return [v for v in values if v]


def without_userinfo(text: str) -> str:
    """`text` with the user and password of every URL in it replaced (for startup errors,
    which print settings such as STORE_URL)."""
    return URL_USERINFO.sub(r"\1[redacted]@", text)


class Scrubber:
    """Removes secrets from text: the configured values, and anything shaped like a token."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        for pattern, replacement in PATTERNS:
            text = pattern.sub(replacement, text)
        return text


class RelayFormatter(logging.Formatter):
    """Text or one JSON object per line; the request id on both; secrets scrubbed."""

    def __init__(self, json_lines: bool, scrub: Scrubber) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self.json_lines = json_lines
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__  # where a record keeps its `extra` fields, the request id among them
        fields.setdefault("request_id", REQUEST_ID.get())
        if not self.json_lines:
            return self.scrub(super().format(record))
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "request_id": fields["request_id"],
            "message": record.getMessage(),
        }
        for key in ("stream", "access"):  # structured fields of summary lines
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.scrub(json.dumps(entry, ensure_ascii=False, default=str))


def configure(level: str, log_format: str, secrets: Iterable[str]) -> None:
    """The app's handler on the root logger (replaced, not added again, when apps are rebuilt)."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(RelayFormatter(log_format == "json", Scrubber(secrets)))
    root.addHandler(handler)


def request_id_from(headers: Headers, trusted: bool, make: Callable[[], str]) -> str:
    """The proxy's X-Request-ID when it is trusted and well formed, else a new id."""
    given = headers.get("X-Request-ID", "") if trusted else ""
    return given if REQUEST_ID_SHAPE.fullmatch(given) else make()


try:
    from gunicorn.glogging import Logger as _GunicornLogger
except ImportError:  # gunicorn is not on every deployment (mod_wsgi)
    _GunicornLogger = object


# gunicorn has no type hints: to the checker its Logger is Any, which a strict check refuses to subclass.
class GunicornLogger(_GunicornLogger):  # type: ignore[misc]
    """gunicorn's logs through the same scrubber; access lines as JSON when LOG_FORMAT=json."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        import os

        self.scrub = Scrubber(configured_secrets(os.environ))
        self.json_lines = os.environ.get("LOG_FORMAT", "").lower() == "json"
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(RelayFormatter(self.json_lines, self.scrub)
                                     if logger is self.error_log or self.json_lines
                                     else _ScrubbingFormatter(handler.formatter, self.scrub))

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key in ("r", "q", "U"):  # the request line and query string carry ?access_token=
            if isinstance(atoms.get(key), str):
                atoms[key] = self.scrub(atoms[key])
        return atoms

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if not self.json_lines:
            super().access(resp, req, environ, request_time)
            return
        if not (self.cfg.accesslog or self.cfg.logconfig or self.cfg.syslog):
            return None
        atoms = self.atoms(resp, req, environ, request_time)
        request_id = dict((k.lower(), v) for k, v in (resp.headers or ())).get("x-request-id", "-")
        access = {"method": atoms["m"], "path": atoms["U"], "query": atoms["q"], "status": atoms["s"],
                  "bytes": atoms["B"], "duration_ms": round(request_time.total_seconds() * 1000, 1),
                  "remote": atoms["h"], "user_agent": atoms["a"]}
        self.access_log.info("%s %s %s", atoms["m"], atoms["U"], atoms["s"],
                             extra={"access": access, "request_id": request_id})


class _ScrubbingFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None, scrub: Scrubber) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter("%(message)s")
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        return self.scrub(self.inner.format(record))
