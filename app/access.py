"""Who is calling and what they may do: bearer tokens and JWTs, the origin of browser
requests, rate limits, per-client caps, and CORS. Limits are counted in the store, so
every process and host shares them. docs/security.md says what each rule protects.

- `API_TOKENS` (comma-separated) and/or JWTs turn auth on for every API route. JWTs are
  verified by PyJWT: HS256 with `JWT_SECRET`, RS256/ES256 with `JWT_PUBLIC_KEY` or a
  `JWT_JWKS_FILE`; `exp` and a non-empty `sub` are required, `aud`/`iss` checked when
  set, and a token may not live longer than `JWT_MAX_LIFETIME`.
- A request from a browser page of another origin (its `Origin`, or `Sec-Fetch-Site`)
  is refused unless that origin is in `CORS_ORIGINS`: without it, any web page could
  make its visitors' browsers spend the operator's provider credit.
- `RATE_LIMIT` counts requests that start an answer, per caller; `MAX_STREAMS_PER_CLIENT`
  caps answers in progress and `MAX_TICKETS_PER_CLIENT` unopened POST-SSE payloads.
- `STORAGE_QUOTA_BYTES` caps what one caller keeps stored in conversations (`MeteredStore`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import Blueprint, Flask, Request, Response, g, request

from app.config import ConfigError, Settings
from app.errors import ApiError
from app.store.base import ConversationInfo, ConversationStore, Store, Ticket, to_json

log = logging.getLogger("llm_sse_relay.access")

WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
# A stream slot lives this long unless its process refreshes it: a killed process's
# slots free themselves within a minute.
SLOT_TTL = 60.0
# Far above any real JWT (a few hundred bytes to a few kB); bounds the work a token costs.
MAX_TOKEN_CHARS = 8192
# base64url without padding, as RFC 7515 requires: a lenient decoder would let "=" or
# "!!" appended to a signature still verify, so the shape is checked before PyJWT.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
ASYMMETRIC = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}


# Told the reason when a limit says no (metrics count refusals by it).
Refusal = Callable[[str], None]
# How a blueprint's routes know their caller (see `guard`).
Identity = Literal["required", "optional"] | None


@dataclass(frozen=True)
class Caller:
    id: str
    authenticated: bool


def parse_rate(text: str, name: str = "RATE_LIMIT") -> tuple[int, float] | None:
    """"60/minute" -> (60, 60.0); "" -> None (no limit)."""
    if not text:
        return None
    count, _, unit = text.partition("/")
    unit = unit.strip().lower().rstrip("s") or "minute"
    if not count.strip().isdigit() or unit not in WINDOWS:
        raise ValueError(f"{name}={text!r}: expected N/second, N/minute, N/hour or N/day")
    return int(count), float(WINDOWS[unit])


class TokenVerifier:
    """JWT verification by PyJWT, with the keys and rules of the settings."""

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.JWT_SECRET
        if self.secret and len(self.secret.encode()) < 32:
            # RFC 7518 3.2: an HS256 key shorter than the hash can be brute-forced offline.
            log.warning("JWT_SECRET is shorter than 32 bytes; use a longer random secret")
        self.public_key = _load_public_key(settings.JWT_PUBLIC_KEY) if settings.JWT_PUBLIC_KEY else None
        self.jwks = _load_jwks(settings.JWT_JWKS_FILE) if settings.JWT_JWKS_FILE else None
        self.audience = settings.JWT_AUDIENCE or None
        self.issuer = settings.JWT_ISSUER or None
        self.leeway = settings.JWT_LEEWAY
        self.max_lifetime = settings.JWT_MAX_LIFETIME
        allowed = {a.strip() for a in settings.JWT_ALGORITHMS.split(",") if a.strip()}
        if not allowed:
            allowed = {"HS256"} if self.secret else set()
            if self.public_key is not None or self.jwks is not None:
                allowed |= {"RS256", "ES256"}
        unknown = allowed - ASYMMETRIC - {"HS256", "HS384", "HS512"}
        if unknown:
            raise ConfigError(f"JWT_ALGORITHMS: unknown algorithm(s) {', '.join(sorted(unknown))}")
        self.algorithms = allowed

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key is not None or self.jwks is not None)

    def identity(self, token: str) -> str | None:
        """The caller id of a valid token, or None (every failure looks the same to the caller)."""
        if len(token) > MAX_TOKEN_CHARS or not TOKEN_SHAPE.fullmatch(token):
            return None
        try:
            claims = self._claims(token)
        except Exception as exc:  # PyJWT's errors, and what hostile JSON makes it raise (RecursionError, …)
            log.info("JWT refused: %s", type(exc).__name__ if not isinstance(exc, jwt.PyJWTError) else exc)
            return None
        if claims is None:
            return None
        subject = f"{claims.get('iss', '')}\0{claims['sub']}"
        return "jwt:" + hashlib.sha256(subject.encode()).hexdigest()[:32]

    def _claims(self, token: str) -> dict[str, Any] | None:
        header = jwt.get_unverified_header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            return None
        key = self._key_for(algorithm, header.get("kid"))
        if key is None:
            return None
        required = ["exp", "sub"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        claims = jwt.decode(token, key, algorithms=[algorithm], audience=self.audience, issuer=self.issuer,
                            leeway=self.leeway, options={"require": required})
        exp, iat, sub = claims.get("exp"), claims.get("iat"), claims.get("sub")
        if not isinstance(sub, str) or not sub.strip():
            return None  # tokens without a subject would all share one identity
        if not _finite(exp):
            return None
        now = time.time()
        start = iat if _finite(iat) and iat <= now + self.leeway else now
        if exp - start > self.max_lifetime or exp - now > self.max_lifetime:
            return None
        return claims

    def _key_for(self, algorithm: str, kid: Any) -> Any:
        if algorithm.startswith("HS"):
            return self.secret or None
        if self.jwks is not None:
            keys = self.jwks.keys
            if kid is None:
                candidates = keys if len(keys) == 1 else []
            else:
                candidates = [k for k in keys if k.key_id == kid]
            for jwk in candidates:
                if jwk.algorithm_name == algorithm or (jwk.algorithm_name is None and _fits(jwk.key, algorithm)):
                    return jwk.key
            return None
        if self.public_key is not None and _fits(self.public_key, algorithm):
            return self.public_key
        return None


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fits(key: Any, algorithm: str) -> bool:
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    return False


def _load_public_key(value: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """A PEM public key given inline or as a file path."""
    try:
        if "-----BEGIN" in value:
            pem = value.encode()
        else:
            with open(value, "rb") as handle:
                pem = handle.read()
        key = load_pem_public_key(pem)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY: cannot load a PEM public key ({exc})") from exc
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError("JWT_PUBLIC_KEY: only RSA and EC public keys are supported")
    return key


def _load_jwks(path: str) -> jwt.PyJWKSet:
    try:
        with open(path, encoding="utf-8") as handle:
            return jwt.PyJWKSet.from_json(handle.read())
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        raise ConfigError(f"JWT_JWKS_FILE: cannot load a JWKS from {path} ({exc})") from exc


class Access:
    """Identity, ownership, origins, rate limits and slots, for every way into the app."""

    def __init__(self, settings: Settings, store: Store, on_refusal: Refusal | None = None) -> None:
        self.tokens = [t.strip() for t in settings.API_TOKENS.split(",") if t.strip()]
        self.verifier = TokenVerifier(settings)
        self.rate = parse_rate(settings.RATE_LIMIT)
        self.max_streams = settings.MAX_STREAMS_PER_CLIENT
        self.max_tickets = settings.MAX_TICKETS_PER_CLIENT
        self.max_readers = settings.MAX_READERS_PER_CLIENT
        self.trusted_proxies = settings.TRUSTED_PROXIES
        self.ipv6_prefix = settings.IPV6_CLIENT_PREFIX
        origins = [o.strip().rstrip("/") for o in settings.CORS_ORIGINS.split(",") if o.strip()]
        self.any_origin = "*" in origins
        self.origins = set(origins) - {"*"}
        self.store = store
        self.held: set[tuple[str, str]] = set()  # this process's live stream and reader slots, refreshed together
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._warned_proxy = False
        self.on_refusal = on_refusal or (lambda reason: None)  # metrics: a limit said no
        self.lookups = LookupMisses(parse_rate(settings.STREAM_LOOKUP_LIMIT, "STREAM_LOOKUP_LIMIT"), self.on_refusal)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.verifier.enabled)

    # -- identity
    def caller(self, req: Request, token: object = None, api_key_header: bool = False) -> Caller:
        """Who is calling; raises 401 when auth is on and the credentials are missing or bad.

        `token` is what a transport without headers carried (the WebSocket's first message);
        `api_key_header`: the route also takes the token as `x-api-key` (see `guard`).
        """
        if token is None:
            header = req.headers.get("Authorization", "")
            if header[:7].lower() == "bearer ":
                token = header[7:].strip()
            elif api_key_header:
                token = req.headers.get("x-api-key") or None
            elif req.method == "GET":
                # EventSource cannot send headers; this lands in access logs, prefer POST-SSE.
                token = req.args.get("access_token") or None
        if not self.enabled:
            # No identities to tell apart: a key an SDK insists on sending (the OpenAI SDKs need
            # one) is ignored, and limits count the client address.
            token = None
        if token is not None and not isinstance(token, str):
            raise ApiError(401, "unauthorized", "the access token must be a string", {"WWW-Authenticate": "Bearer"})
        if token:
            identity = self.identify(token)
            if identity is None:
                raise ApiError(401, "unauthorized", "the access token is not valid", {"WWW-Authenticate": "Bearer"})
            return Caller(identity, True)
        if self.enabled:
            raise ApiError(401, "unauthorized", "this API needs an access token (Authorization: Bearer …)",
                           {"WWW-Authenticate": "Bearer"})
        if not self.trusted_proxies and not self._warned_proxy and req.headers.get("X-Forwarded-For"):
            self._warned_proxy = True
            log.warning("requests carry X-Forwarded-For but TRUSTED_PROXIES=0: behind a proxy every client "
                        "shares the proxy's address, so per-client limits count them together")
        return Caller(self.client_id(req), False)

    def client_id(self, req: Request) -> str:
        """The identity of a caller without credentials: its address (the proxy's, unless
        TRUSTED_PROXIES lets the app see past it), an IPv6 one as its network."""
        return f"ip:{client_network(req.remote_addr or '', self.ipv6_prefix)}"

    def identify(self, token: str) -> str | None:
        for known in self.tokens:
            if hmac.compare_digest(token.encode(), known.encode()):
                return "token:" + hashlib.sha256(known.encode()).hexdigest()[:16]
        if self.verifier.enabled and token.count(".") == 2:
            return self.verifier.identity(token)
        return None

    def owns(self, caller: Caller | None, owner: str | None) -> bool:
        """Whether `caller` may use what `owner` created. With auth off there are no identities
        to tell apart: ids (128 random bits, issued by the server) are the capability."""
        if not self.enabled:
            return True
        return caller is not None and owner is not None and hmac.compare_digest(caller.id, owner)

    # -- origins
    def check_origin(self, req: Request) -> None:
        """Refuse a browser request made by a page of another origin that CORS_ORIGINS does not list."""
        origin = req.headers.get("Origin")
        if origin is not None:
            if origin.rstrip("/") in self.origins or self.any_origin or _same_origin(origin, req):
                return
            raise ApiError(403, "forbidden_origin", "requests from this origin are not allowed (CORS_ORIGINS)")
        # No Origin: a server-side client, or a browser's no-cors GET (<img>, <script>), which
        # modern browsers mark with Sec-Fetch-Site.
        if req.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site") and not self.any_origin:
            raise ApiError(403, "forbidden_origin", "cross-site requests are not allowed (CORS_ORIGINS)")

    # -- limits
    def count_request(self, caller: Caller) -> None:
        if self.rate is None:
            return
        limit, window = self.rate
        hits, reset = self.store.hit(f"rate:{caller.id}", window)
        if hits > limit:
            self.on_refusal("rate_limited")
            raise ApiError(429, "rate_limited", f"more than {limit} requests per {window:g} s; try again later",
                           {"Retry-After": str(max(1, math.ceil(reset)))})

    def open_stream(self, caller_id: str, stream_id: str) -> None:
        """Take a slot for an answer in progress; release with `close_stream`."""
        self._take(f"streams:{caller_id}", stream_id, self.max_streams, "too_many_streams",
                   f"{self.max_streams} answers are already in progress for this client")

    def close_stream(self, caller_id: str, stream_id: str) -> None:
        self._give(f"streams:{caller_id}", stream_id, self.max_streams)

    def close_stream_dropping(self, caller_id: str, stream_id: str, ticket_id: str) -> None:
        """`close_stream`, and the ticket `ticket_id` deleted in the same store write (a
        stream's end costs one write, not two)."""
        slot = self.closing_stream(caller_id, stream_id)
        if slot is None:
            self.store.take_ticket(ticket_id)
        else:
            self.store.release_dropping(*slot, ticket_id)

    def closing_stream(self, caller_id: str, stream_id: str) -> tuple[str, str] | None:
        """`close_stream` for a caller that gives the slot back in a store write of its own: the
        slot's (key, member), no longer kept alive here; None when streams are not capped."""
        if not self.max_streams:
            return None
        key = f"streams:{caller_id}"
        with self._lock:
            self.held.discard((key, stream_id))
        return key, stream_id

    def open_reader(self, caller_id: str, reader_id: str) -> None:
        """Take a slot for a response reading a POST-SSE stream; release with `close_reader`."""
        self._take(f"readers:{caller_id}", reader_id, self.max_readers, "too_many_readers",
                   f"{self.max_readers} stream responses are already open for this client")

    def close_reader(self, caller_id: str, reader_id: str) -> None:
        self._give(f"readers:{caller_id}", reader_id, self.max_readers)

    @contextmanager
    def stream_slot(self, caller_id: str, stream_id: str) -> Iterator[None]:
        """`open_stream` for the block, `close_stream` when it ends, however it ends. A slot
        that outlives the block (a stream's, held until its generation ends) is taken with
        `ExitStack.enter_context` and handed on with `pop_all()`."""
        self.open_stream(caller_id, stream_id)
        try:
            yield
        finally:
            self.close_stream(caller_id, stream_id)

    @contextmanager
    def reader_slot(self, caller_id: str, reader_id: str) -> Iterator[None]:
        """`open_reader` for the block, `close_reader` when it ends (see `stream_slot`)."""
        self.open_reader(caller_id, reader_id)
        try:
            yield
        finally:
            self.close_reader(caller_id, reader_id)

    @contextmanager
    def held_ticket(self, caller_id: str, ticket_id: str, ttl: float) -> Iterator[None]:
        """`hold_ticket` for a ticket the block stores, given back if the block fails. A ticket
        stored stays held after the block, until it is opened, stopped (`release_ticket`) or
        expires."""
        self.hold_ticket(caller_id, ticket_id, ttl)
        try:
            yield
        except BaseException:
            self.release_ticket(caller_id, ticket_id)
            raise

    def _take(self, key: str, member: str, limit: int, refusal: str, message: str) -> None:
        """A slot of `key` (at most `limit` live at once, 0 = no cap), kept alive until given back."""
        if not limit:
            return
        if not self.store.acquire(key, member, limit, SLOT_TTL):
            self.on_refusal(refusal)
            raise ApiError(429, refusal, message, {"Retry-After": "5"})
        with self._lock:
            self.held.add((key, member))
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep, name="relay-slot-keeper", daemon=True)
                self._keeper.start()

    def _give(self, key: str, member: str, limit: int) -> None:
        if not limit:
            return
        with self._lock:
            self.held.discard((key, member))
        self.store.release(key, member)

    def hold_ticket(self, caller_id: str, ticket_id: str, ttl: float) -> None:
        """An unopened POST-SSE payload counts against its creator until opened or expired."""
        if self.max_tickets and not self.store.acquire(f"tickets:{caller_id}", ticket_id, self.max_tickets, ttl):
            self.on_refusal("too_many_tickets")
            raise ApiError(429, "too_many_tickets",
                           f"{self.max_tickets} streams are already waiting to be opened for this client",
                           {"Retry-After": "5"})

    def release_ticket(self, caller_id: str, ticket_id: str) -> None:
        if self.max_tickets:
            self.store.release(f"tickets:{caller_id}", ticket_id)

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
        """The CORS headers of an API response (an `after_request` of the API's blueprints)."""
        origin = request.headers.get("Origin")
        if not origin:
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


# The storage quota is held in slots of this many bytes: a conversation of n bytes holds
# ceil(n / QUOTA_UNIT) of its owner's slots. Small enough that rounding costs little (a
# 64 MiB quota is 4096 slots), large enough that a turn takes one or two slot writes.
QUOTA_UNIT = 16_384
# A slot limit no caller reaches: what is already stored is counted whatever the quota.
PAST_THE_QUOTA = 2**31 - 1
# Callers that are the application itself (the Python API outside any request), not clients.
UNMETERED = "local:"


class MeteredStore(ConversationStore):
    """The store as `Conversations` uses it, with every record counted against its owner's
    `STORAGE_QUOTA_BYTES` for as long as it is kept. Conversation writes and deletes pass
    through the quota; reads go to the store unchanged.

    A conversation holds slots of its owner in the store's slot sets (shared by every process
    and host, like the stream slots), named after it and refreshed with it: they expire when
    it expires (its TTL restarts on every append, and so do they) and are given back when it
    is deleted, so what a caller holds is what it keeps stored, whoever serves it.

    `append_messages` stores a request's own records and is refused (413) when they do not fit;
    `append_message` stores an answer already generated: it is kept and counted even past the
    quota (by at most the answers in progress), and the caller's next request is refused.
    """

    def __init__(self, store: Store, quota: int) -> None:
        self.store = store
        self.quota = quota

    def conversation(self, conversation_id: str) -> ConversationInfo | None:
        return self.store.conversation(conversation_id)

    def messages(self, conversation_id: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        return self.store.messages(conversation_id, start, stop)

    def append_messages(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float,
                        owner: str = "") -> ConversationInfo | None:
        holder, held, kept = self._hold(conversation_id, messages, ttl, owner, refuse=True)
        info = self.store.append_messages(conversation_id, messages, ttl, owner)
        self._keep(conversation_id, holder, held, kept, ttl, info)
        return info

    def append_message(self, conversation_id: str, message: dict[str, Any], ttl: float,
                       owner: str = "") -> ConversationInfo | None:
        holder, held, kept = self._hold(conversation_id, [message], ttl, owner, refuse=False)
        info = self.store.append_message(conversation_id, message, ttl, owner)
        self._keep(conversation_id, holder, held, kept, ttl, info)
        return info

    def start_conversation(self, conversation_id: str, messages: list[dict[str, Any]], ttl: float, owner: str,
                           ticket: Ticket | None = None) -> ConversationInfo:
        holder, held, kept = self._hold(conversation_id, messages, ttl, owner, refuse=True, new=True)
        info = self.store.start_conversation(conversation_id, messages, ttl, owner, ticket)
        self._keep(conversation_id, holder, held, kept, ttl, info)
        return info

    def append_message_releasing(self, conversation_id: str, message: dict[str, Any], ttl: float, owner: str,
                                 slot: tuple[str, str] | None, ticket_id: str) -> ConversationInfo | None:
        holder, held, kept = self._hold(conversation_id, [message], ttl, owner, refuse=False)
        info = self.store.append_message_releasing(conversation_id, message, ttl, owner, slot, ticket_id)
        self._keep(conversation_id, holder, held, kept, ttl, info)
        return info

    def delete_conversation(self, conversation_id: str) -> bool:
        info = self.store.conversation(conversation_id) if self.quota else None
        deleted = self.store.delete_conversation(conversation_id)
        if deleted and info is not None and self._metered(info.owner):
            for unit in range(_units(info.bytes)):
                self.store.release(_quota_key(info.owner), f"{conversation_id}:{unit}")
        return deleted

    def hold(self, owner: str, name: str, size: int, ttl: float) -> None:
        """Count `size` bytes kept outside conversations under `name` (a background answer's
        stream log, which echoes its request and outlives a deleted conversation) against
        `owner` for `ttl` seconds; 413 when they do not fit. They are not given back early."""
        if not self._metered(owner):
            return
        for unit in range(_units(size)):
            if not self.store.acquire(_quota_key(owner), f"{name}:{unit}", self.quota // QUOTA_UNIT, ttl):
                self.unhold(owner, name, unit * QUOTA_UNIT)
                raise ApiError(413, "storage_quota_exceeded",
                               f"storing this would take this client past its storage quota ({self.quota} bytes); "
                               f"delete what it no longer needs, or wait for it to expire")

    def unhold(self, owner: str, name: str, size: int) -> None:
        """Give back what `hold` took (nothing was stored after all)."""
        if self._metered(owner):
            for unit in range(_units(size)):
                self.store.release(_quota_key(owner), f"{name}:{unit}")

    def _metered(self, owner: str) -> bool:
        return bool(self.quota) and not owner.startswith(UNMETERED)

    def _hold(self, conversation_id: str, records: list[dict[str, Any]], ttl: float, owner: str,
              refuse: bool, new: bool = False) -> tuple[str, int, int]:
        """Take the slots the conversation needs once `records` are added: whose slots, how
        many the conversation holds then, and how many of them it held before (`new`: none,
        its id was just issued)."""
        if not self.quota:
            return owner, 0, 0
        info = None if new else self.store.conversation(conversation_id)
        if info is not None:  # what a conversation keeps counts against whoever it belongs to
            owner = info.owner
        if not self._metered(owner):
            return owner, 0, 0
        before = info.bytes if info is not None else 0
        needed = _units(before + sum(len(to_json(r).encode()) for r in records))
        taken = []
        for unit in range(_units(before), needed):
            member = f"{conversation_id}:{unit}"
            if self.store.acquire(_quota_key(owner), member, self.quota // QUOTA_UNIT, ttl):
                taken.append(member)
            elif refuse:
                for member in taken:
                    self.store.release(_quota_key(owner), member)
                raise ApiError(413, "storage_quota_exceeded",
                               f"storing this would take this client past its storage quota ({self.quota} bytes "
                               f"of conversations); delete conversations it no longer needs, or wait for them to "
                               f"expire")
        return owner, needed, _units(before)

    def _keep(self, conversation_id: str, owner: str, held: int, kept: int, ttl: float,
              info: ConversationInfo | None) -> None:
        """The conversation's slots cover what it holds now and live as long as it does. Records
        another request appended between this one's count and its append (two turns of one
        conversation at once) are counted here, past the quota if need be, so the caller's next
        request is refused: the store never holds more than is counted. A record its tombstone
        refused (deleted while its answer ran) holds none. Only the `kept` slots it held before
        need refreshing: the others were taken just now with the same TTL (a new conversation,
        the start of every stream that begins one, saves a store write)."""
        key = _quota_key(owner)
        if info is None:
            for unit in range(held):
                self.store.release(key, f"{conversation_id}:{unit}")
            return
        if not held:  # not metered
            return
        for unit in range(held, _units(info.bytes)):
            self.store.acquire(key, f"{conversation_id}:{unit}", PAST_THE_QUOTA, ttl)
        if kept:
            self.store.refresh([(key, f"{conversation_id}:{unit}") for unit in range(kept)], ttl)


def _units(size: int) -> int:
    return -(-size // QUOTA_UNIT)


def _quota_key(owner: str) -> str:
    return f"storage:{owner}"


class LookupMisses:
    """Stream ids asked for that do not exist, per client, counted in this process's memory:
    in the store each would cost a write, and costing no write is the point (unauthenticated
    readers may knock on stream URLs). Beyond the limit, a client's stream lookups get 429
    until the window ends. Each process counts its own: N processes allow N times the limit."""

    # Clients remembered in one window; beyond, the counts start over (memory stays bounded).
    MAX_CLIENTS = 100_000

    def __init__(self, rate: tuple[int, float] | None, on_refusal: Refusal) -> None:
        self.rate = rate
        self.on_refusal = on_refusal
        self.counts: dict[str, int] = {}
        self.window_ends = 0.0
        self._lock = threading.Lock()

    def check(self, client: str) -> None:
        """429 when `client` missed too often in this window."""
        if self.rate is None:
            return
        limit, window = self.rate
        now = time.monotonic()
        with self._lock:
            if now >= self.window_ends:
                self.counts.clear()
                self.window_ends = now + window
            over = self.counts.get(client, 0) >= limit
            reset = self.window_ends - now
        if over:
            self.on_refusal("too_many_lookups")
            raise ApiError(429, "rate_limited", f"more than {limit} unknown stream ids per {window:g} s; "
                           "try again later", {"Retry-After": str(max(1, math.ceil(reset)))})

    def missed(self, client: str) -> None:
        if self.rate is None:
            return
        with self._lock:
            if len(self.counts) >= self.MAX_CLIENTS:
                self.counts.clear()
            self.counts[client] = self.counts.get(client, 0) + 1


def client_network(address: str, ipv6_prefix: int) -> str:
    """An address as the client it stands for: an IPv4 address alone (also when a dual-stack
    socket writes it as ::ffff:a.b.c.d), an IPv6 one as its /`ipv6_prefix` network, since a
    host holds a whole /64 and may use a new address of it for every request."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # without a link-local zone (fe80::1%eth0)
    except ValueError:
        return address  # not an address (a unix socket's peer): itself
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


def _same_origin(origin: str, req: Request) -> bool:
    """The page that sent the request is this server's own (the demo page, an app on the same host).

    Behind a proxy that rewrites Host, the host the browser used arrives as X-Forwarded-Host.
    Trusting it here is safe: a page cannot add that header to a cross-origin request
    without a CORS preflight, which fails for origins not listed.
    """
    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:
        return False
    forwarded = req.headers.get("X-Forwarded-Host", "").split(",")[0].strip().lower()
    return bool(netloc) and netloc in (req.host.lower(), forwarded)


def guard(app: Flask, blueprint: Blueprint, access: Access, *, origin: bool = True,
          identity: Identity = "required", api_key_header: bool = False) -> None:
    """Who may use `blueprint`'s routes in `app`, decided by its own `before_request` (Flask's
    blueprint-scoped hooks, registered on the app so they hold this app's `Access`): the origin
    of a browser's request, then the caller's identity in `g.caller`; and CORS headers on its
    responses.

    `identity`: "required" (401 without valid credentials when auth is on), "optional" (stream
    URLs: the unguessable id is the credential, and one who sends a token must be its creator),
    or None (the WebSocket checks its first message instead; what the server offers is open).
    `api_key_header`: the token may also come as Anthropic's `x-api-key` (older `anthropic`
    SDKs, curl examples from Anthropic's docs); everywhere else it is `Authorization: Bearer`.
    """

    def admit() -> None:
        if request.method == "OPTIONS":  # a CORS preflight carries no credentials
            return
        if origin:
            access.check_origin(request)
        if identity == "required":
            g.caller = access.caller(request, api_key_header=api_key_header)
        elif identity == "optional":
            g.caller = access.caller(request) if request.headers.get("Authorization") else None

    app.before_request_funcs.setdefault(blueprint.name, []).append(admit)
    app.after_request_funcs.setdefault(blueprint.name, []).append(access.cors)


def guard_metrics(app: Flask, blueprint: Blueprint, access: Access, token: str) -> None:
    """`/metrics` takes its own credential, `METRICS_TOKEN`, for a Prometheus that holds no API
    token; without one it is protected like the API (401 when auth is on and the token is missing)."""

    def admit() -> None:
        if not token:
            access.caller(request)
            return
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "/metrics needs METRICS_TOKEN as a bearer token",
                           {"WWW-Authenticate": "Bearer"})

    app.before_request_funcs.setdefault(blueprint.name, []).append(admit)
