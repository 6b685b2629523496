"""Who is calling and what they may do: bearer tokens and JWT, rate limits, open-stream
caps, and CORS. Limits are counted in the store, so every process and host shares them.

- `API_TOKENS` (comma-separated) and/or `JWT_SECRET` (HS256, `exp` required) turn auth on
  for every API route. `EventSource` cannot send headers: POST-SSE step 1 is
  authenticated and its unguessable stream id is bound to the caller (only the creator
  may stop it, and a reader who does present credentials must be the creator).
- `RATE_LIMIT` ("60/minute", "5/second", "1000/hour") counts requests that start an
  answer, per caller (token identity, else client address); over it: 429 + Retry-After.
- `MAX_STREAMS_PER_CLIENT` caps answers in progress at once per caller.
- `CORS_ORIGINS` ("https://a.example,https://b.example" or "*") for browsers on other
  origins; credentials are never allowed together with "*".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Request, Response, g, request

from app.errors import ApiError

WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
# A stream slot lives this long unless its process refreshes it: a killed process's
# slots free themselves within a minute.
SLOT_TTL = 60.0
JWT_LEEWAY = 30


@dataclass(frozen=True)
class Caller:
    id: str
    authenticated: bool


def parse_rate(text: str) -> tuple[int, float] | None:
    """"60/minute" -> (60, 60.0); "" -> None (no limit)."""
    if not text:
        return None
    count, _, unit = text.partition("/")
    unit = unit.strip().lower().rstrip("s") or "minute"
    if not count.strip().isdigit() or unit not in WINDOWS:
        raise ValueError(f"RATE_LIMIT={text!r}: expected N/second, N/minute, N/hour or N/day")
    return int(count), float(WINDOWS[unit])


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def verify_jwt(token: str, secret: str, audience: str = "") -> dict[str, Any]:
    """Claims of a valid HS256 JWT; raises ValueError otherwise (expired, forged, …)."""
    try:
        head, body, signature = token.split(".")
        header = json.loads(_b64(head))
        claims = json.loads(_b64(body))
        given = _b64(signature)
    except (ValueError, TypeError) as exc:
        raise ValueError("malformed token") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise ValueError("only HS256 tokens are accepted")
    expected = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(given, expected):
        raise ValueError("bad signature")
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int | float):
        raise ValueError("the token has no expiry (exp)")
    now = time.time()
    if claims["exp"] < now - JWT_LEEWAY:
        raise ValueError("the token has expired")
    if isinstance(claims.get("nbf"), int | float) and claims["nbf"] > now + JWT_LEEWAY:
        raise ValueError("the token is not valid yet")
    if audience:
        aud = claims.get("aud")
        if audience != aud and not (isinstance(aud, list) and audience in aud):
            raise ValueError("the token is for another audience")
    return claims


def make_jwt(claims: dict[str, Any], secret: str) -> str:
    """An HS256 JWT (for tests and for issuing tokens from your own login route)."""
    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = enc(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(signature)}"


class Access:
    def __init__(self, settings: Any, store: Any) -> None:
        self.tokens = [t.strip() for t in settings.API_TOKENS.split(",") if t.strip()]
        self.jwt_secret = settings.JWT_SECRET
        self.jwt_audience = settings.JWT_AUDIENCE
        self.rate = parse_rate(settings.RATE_LIMIT)
        self.max_streams = settings.MAX_STREAMS_PER_CLIENT
        origins = [o.strip().rstrip("/") for o in settings.CORS_ORIGINS.split(",") if o.strip()]
        self.any_origin = "*" in origins
        self.origins = set(origins) - {"*"}
        self.store = store
        self.held: set[tuple[str, str]] = set()  # this process's live slots, refreshed together
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.jwt_secret)

    # -- identity
    def caller(self, req: Request, token: str | None = None) -> Caller:
        """Who is calling; raises 401 when auth is on and the credentials are missing or bad."""
        if token is None:
            header = req.headers.get("Authorization", "")
            if header[:7].lower() == "bearer ":
                token = header[7:].strip()
            elif req.method == "GET":
                # EventSource cannot send headers; this lands in access logs, prefer POST-SSE.
                token = req.args.get("access_token") or None
        if token:
            identity = self.identify(token)
            if identity is None:
                raise ApiError(401, "unauthorized", "the access token is not valid", {"WWW-Authenticate": "Bearer"})
            return Caller(identity, True)
        if self.enabled:
            raise ApiError(401, "unauthorized", "this API needs an access token (Authorization: Bearer …)",
                           {"WWW-Authenticate": "Bearer"})
        return Caller(f"ip:{req.remote_addr}", False)

    def identify(self, token: str) -> str | None:
        for known in self.tokens:
            if hmac.compare_digest(token.encode(), known.encode()):
                return "token:" + hashlib.sha256(known.encode()).hexdigest()[:16]
        if self.jwt_secret and token.count(".") == 2:
            try:
                claims = verify_jwt(token, self.jwt_secret, self.jwt_audience)
            except ValueError:
                return None
            return f"jwt:{claims.get('sub', '')}"
        return None

    # -- limits
    def count_request(self, caller: Caller) -> None:
        if self.rate is None:
            return
        limit, window = self.rate
        hits, reset = self.store.hit(f"rate:{caller.id}", window)
        if hits > limit:
            raise ApiError(429, "rate_limited", f"more than {limit} requests per {window:g} s; try again later",
                           {"Retry-After": str(max(1, math.ceil(reset)))})

    def open_stream(self, caller_id: str, stream_id: str) -> None:
        """Take a slot for an answer in progress; release with `close_stream`."""
        if not self.max_streams:
            return
        slot = (f"streams:{caller_id}", stream_id)
        if not self.store.acquire(*slot, self.max_streams, SLOT_TTL):
            raise ApiError(429, "too_many_streams",
                           f"{self.max_streams} answers are already in progress for this client",
                           {"Retry-After": "5"})
        with self._lock:
            self.held.add(slot)
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep, name="relay-slot-keeper", daemon=True)
                self._keeper.start()

    def close_stream(self, caller_id: str, stream_id: str) -> None:
        if not self.max_streams:
            return
        slot = (f"streams:{caller_id}", stream_id)
        with self._lock:
            self.held.discard(slot)
        self.store.release(*slot)

    def _keep(self) -> None:
        """Refresh every live slot of this process in one store call, a few times per TTL."""
        while True:
            time.sleep(SLOT_TTL / 4)
            with self._lock:
                slots = list(self.held)
                if not slots:
                    self._keeper = None
                    return
            try:
                self.store.refresh(slots, SLOT_TTL)
            except Exception:  # the store is down: the slots expire, nothing else to do
                pass

    # -- CORS
    def cors(self, response: Response) -> Response:
        origin = request.headers.get("Origin")
        if not origin or not request.path.startswith("/api/"):
            return response
        if self.any_origin:
            # "*" never goes with credentials (browsers refuse it, and it would be unsafe).
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin.rstrip("/") in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        else:
            return response
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Last-Event-ID"
            response.headers["Access-Control-Max-Age"] = "600"
        return response


# Routes open to everyone: health, the page, what the server offers. The WebSocket checks
# its first message instead (browsers cannot set headers on it); stream URLs are capabilities.
PUBLIC = {"/healthz", "/", "/api/capabilities", "/api/chat/ws"}


def install(app: Flask, access: Access) -> None:
    @app.before_request
    def authenticate() -> None:
        if request.method == "OPTIONS" or request.path in PUBLIC or request.path.startswith("/static/"):
            return
        if request.path.startswith("/api/chat/streams/") and request.method == "GET":
            # The unguessable id is the credential; one who sends a token must be its creator.
            g.caller = access.caller(request) if request.headers.get("Authorization") else None
            return
        g.caller = access.caller(request)

    app.after_request(access.cors)
