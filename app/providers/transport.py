"""The HTTP upstream call every adapter shares: one `requests.Session` per provider,
`stream=True`, retries before the first token, the socket shut the moment the stream is
cancelled, and the upstream's failures turned into `ProviderError`s in our words.

An adapter (`HttpProvider` subclass) only says how to build its request, how to parse its
stream's events into deltas (a `StreamParser`), and how to read its error bodies.
"""

from __future__ import annotations

import contextvars
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Protocol

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from app.config import Settings
from app.decoders import DecodeError, SseDecoder, SseEvent
from app.providers import upstream_body
from app.providers.domain import (
    IDLE,
    WAITING,
    Cancellation,
    Delta,
    Idle,
    Meta,
    Provider,
    ProviderError,
    Task,
    Text,
    idle_wait,
)
from app.providers.upstream_body import HeaderWaitAdapter, iter_body, send_awaiting_headers, shut

log = logging.getLogger("llm_sse_relay.upstream")


class StreamParser(Protocol):
    """One answer's SSE events in, its deltas out: state and no I/O (the h11 shape), so an
    adapter's parsing is tested without sockets. A fresh one per call."""

    def feed(self, event: SseEvent) -> list[Delta]:
        """The deltas this event completes (often none: a tool call comes whole, at its end)."""
        ...

    def finish(self) -> list[Delta]:
        """What the end of the body completes; raises `ProviderError` when it came too early."""
        ...


@dataclass(frozen=True)
class UpstreamPolicy:
    """Timeouts and retry bounds of the upstream call. No defaults here: they are Settings'
    (`UPSTREAM_*`), the one place a default is written."""

    connect_timeout: float
    read_timeout: float
    max_retries: int
    retry_base: float
    retry_max_wait: float
    pool_size: int

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamPolicy:
        return cls(connect_timeout=settings.UPSTREAM_CONNECT_TIMEOUT, read_timeout=settings.UPSTREAM_READ_TIMEOUT,
                   max_retries=settings.UPSTREAM_MAX_RETRIES, retry_base=settings.UPSTREAM_RETRY_BASE_SECONDS,
                   retry_max_wait=settings.UPSTREAM_RETRY_MAX_WAIT, pool_size=settings.UPSTREAM_POOL_SIZE)


RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
MAX_ERROR_BODY = 64 * 1024


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, as the official SDKs read it: retry-after-ms, then retry-after."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def refusal_message(provider: str, status: int) -> str:
    """Our words for an upstream's error status; its own text goes to the log."""
    if status in (401, 403):
        return f"{provider} refused this server's credentials (HTTP {status}); the operator must check its key"
    if status == 429:
        return f"{provider} is rate limiting this server (HTTP 429); try again shortly"
    if status >= 500:
        return f"{provider} failed to answer (HTTP {status})"
    return f"{provider} refused the request (HTTP {status})"


class RetryBudget:
    """The retries one request may still spend upstream, shared by its tool rounds (each round
    is a new provider call; without this, each had UPSTREAM_MAX_RETRIES of its own)."""

    __slots__ = ("left",)

    def __init__(self, retries: int) -> None:
        self.left = retries

    def spend(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def retrying(provider: Provider, task: Task, cancel: Cancellation, budget: RetryBudget) -> Iterator[Delta]:
    """`provider`'s answer, its failed calls repeated while no text has been yielded, at most
    `provider.policy.max_retries` times and while `budget` (the request's) lasts. Only an HTTP
    provider has a policy: any other is called once."""
    policy = provider.policy if isinstance(provider, HttpProvider) else None
    attempt = 0
    while True:
        text_started = False
        try:
            for delta in provider.attempt(task, cancel):
                if not text_started and delta.__class__ is Text:
                    text_started = True
                yield delta
            return
        except ProviderError as err:
            if text_started or not err.retryable or policy is None or attempt >= policy.max_retries:
                raise
            if err.retry_after is not None:
                delay = err.retry_after
            else:  # exponential backoff with jitter, so many clients do not retry in step
                delay = policy.retry_base * (2**attempt) * (0.75 + random.random() / 2)
            if delay > policy.retry_max_wait or not budget.spend():
                raise
            attempt += 1
            yield Meta({"retry": {"attempt": attempt, "delay": round(delay, 3), "status": err.status,
                                  "reason": err.message}})
            if (yield from idle_wait(cancel, delay)):
                return


def rate_limits(headers: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers of a response (lower-cased names), told to the reader as `meta`."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(RATE_LIMIT_PREFIXES)}


# Distinct upstream URLs a provider keeps a prepared request for (Gemini's name the model).
MAX_PREPARED_URLS = 64


def upstream_session(base_url: str, pool_size: int) -> requests.Session:
    """A session that reads the environment once, not on every call.

    requests, trusting the environment, scans it for proxies and CA bundles and reads
    ~/.netrc on every request: a quarter of its CPU per call (200 of 800 µs measured), and
    a netrc entry for the provider's host replaced the provider key. Proxies
    (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`) and the CA bundle (`REQUESTS_CA_BUNDLE`,
    `CURL_CA_BUNDLE`) are resolved here, for this provider's base URL; netrc is not read.
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(base_url)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    adapter = HeaderWaitAdapter(pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class HttpProvider(Provider):
    """Base of the adapters that call an HTTP API. Subclasses fill in the wire format."""

    key_required = True

    def __init__(self, name: str, base_url: str, api_key: str | None, default_model: str,
                 policy: UpstreamPolicy, models: tuple[str, ...] = ()) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.default_model = default_model
        self.models = models or (default_model,)
        self.policy = policy
        self.session = upstream_session(self.base_url, policy.pool_size)
        self._templates: dict[str, requests.PreparedRequest] = {}  # see _prepared

    @property
    def configured(self) -> bool:
        return bool(self.api_key) or not self.key_required

    @property
    def idles(self) -> bool:
        return upstream_body.FAST_READS  # the public body reader waits in one read, up to the timeout

    # -- what each wire format defines
    def build_request(self, task: Task) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise NotImplementedError

    def stream_parser(self, task: Task) -> StreamParser:
        """A fresh parser of one answer's events."""
        raise NotImplementedError

    def error_message(self, body: Any) -> tuple[str | None, float | None]:
        """The provider's error text (and any retry delay) from a JSON error body."""
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"]), None
            if isinstance(err, str):
                return err, None
            if body.get("message"):
                return str(body["message"]), None
        return None, None

    # -- the shared machinery
    def stream(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        """Deltas of one answer; retries only while no text has been yielded."""
        return retrying(self, task, cancel, RetryBudget(self.policy.max_retries))

    def attempt(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        """One call: the request sent, its response read to the end (or to the cancel)."""
        if cancel.is_set():
            return
        url, headers, body = self.build_request(task)
        # identity: a gzip decoder would hold back text until it has a full block.
        headers = {"Accept-Encoding": "identity", "Content-Type": "application/json", **headers}
        response = yield from self._connect(url, headers, body, cancel)
        if response is None:  # cancelled while waiting for the response headers
            return
        unregister = cancel.on_cancel(lambda: shut(response))
        try:
            if response.status_code >= 400:
                raise self._error_from_response(response)
            limits = rate_limits(response.headers)
            if limits:
                yield Meta({"rate_limit": limits})
            yield from self._read(response, url, self.stream_parser(task), cancel)
        finally:
            unregister()
            response.close()

    def _connect(self, url: str, headers: dict[str, str], body: dict[str, Any],
                 cancel: Cancellation) -> Generator[Idle, None, requests.Response | None]:
        """`_send`, with a request that got no response as our error."""
        try:
            return (yield from self._send(url, headers, body, cancel))
        except requests.Timeout as exc:
            log.warning("%s: no answer from %s: %s", self.name, url, exc)
            raise ProviderError("upstream_timeout", f"{self.name} did not answer in time", retryable=True) from exc
        except requests.RequestException as exc:
            # The exception names hosts, ports and urllib3's classes: for the log only.
            log.warning("%s: cannot reach %s: %s", self.name, url, exc)
            raise ProviderError("upstream_unreachable", f"cannot reach {self.name}", retryable=True) from exc

    def _read(self, response: requests.Response, url: str, parser: StreamParser,
              cancel: Cancellation) -> Iterator[Delta]:
        """The deltas of a response's body, and of its end; a body that goes silent, breaks off or
        is not SSE as our error (nothing, once cancelled: the reader has gone)."""
        try:
            yield from self._events(response, parser, cancel)
        except (ReadTimeoutError, requests.Timeout, TimeoutError) as exc:
            if cancel.is_set():
                return
            raise ProviderError("upstream_timeout",
                                f"{self.name} sent nothing for {self.policy.read_timeout:g} s") from exc
        except (ProtocolError, HTTPException, OSError, requests.RequestException) as exc:
            if cancel.is_set():
                return
            log.warning("%s: stream from %s broke: %s", self.name, url, exc)
            raise ProviderError("upstream_disconnected", f"{self.name} closed the stream before its end") from exc
        except DecodeError as exc:
            log.warning("%s: malformed stream from %s: %s", self.name, url, exc)
            raise ProviderError("upstream_protocol_error", f"{self.name} sent a malformed stream") from exc
        if cancel.is_set():
            return
        yield from parser.finish()

    def _events(self, response: requests.Response, parser: StreamParser, cancel: Cancellation) -> Iterator[Delta]:
        """The body's bytes -> SSE events -> deltas, as they arrive; with `idle_after` set, `IDLE`
        while nothing comes and `WAITING` before each read that may block."""
        decoder = SseDecoder()
        waits = cancel.idle_after is not None
        for chunk in iter_body(response, cancel.idle_after, self.policy.read_timeout):
            if not chunk:  # silence so far: the driver's turn
                yield IDLE
                if cancel.is_set():
                    return
                continue
            for event in decoder.decode(chunk):
                yield from parser.feed(event)
            if cancel.is_set():
                return
            if waits:  # what this read held is out; the next one may block
                yield WAITING
        for event in decoder.flush():
            yield from parser.feed(event)

    def _send(self, url: str, headers: dict[str, str], body: dict[str, Any],
              cancel: Cancellation) -> Generator[Idle, None, requests.Response | None]:
        """POST the request; the response once its headers are in (None if cancelled before).

        With `idle_after` set, the wait for the headers (a model loading can take a minute) is
        sliced on this thread, `IDLE` between slices (`send_awaiting_headers`): a thread per
        call was an OS thread per stream under mod_wsgi, started during a burst of them.
        """
        request = self._prepared(url, headers, body)
        timeout = (self.policy.connect_timeout, self.policy.read_timeout)
        if cancel.idle_after is None:
            return self.session.send(request, stream=True, timeout=timeout, verify=self.session.verify,
                                     proxies=self.session.proxies)
        if upstream_body.HEADER_WAIT and isinstance(self.session.get_adapter(url), HeaderWaitAdapter):
            return (yield from send_awaiting_headers(self.session, request, timeout, cancel))
        return (yield from self._send_on_a_thread(request, timeout, cancel))

    def _send_on_a_thread(self, request: requests.PreparedRequest, timeout: tuple[float, float],
                          cancel: Cancellation) -> Generator[Idle, None, requests.Response | None]:
        """The wait for the headers on a short-lived helper thread, while this one yields `IDLE`:
        only where urllib3 no longer has what `send_awaiting_headers` needs (`HEADER_WAIT`)."""
        def send() -> requests.Response:
            return self.session.send(request, stream=True, timeout=timeout, verify=self.session.verify,
                                     proxies=self.session.proxies)

        outcome: dict[str, Any] = {}
        settled = threading.Lock()  # the helper hands the response over, or closes it when nobody waits
        wake = threading.Event()

        def run() -> None:
            try:
                result: requests.Response | BaseException = send()
            except BaseException as exc:  # re-raised on the driver's thread
                result = exc
            with settled:
                if outcome.get("abandoned"):
                    if isinstance(result, requests.Response):
                        result.close()
                    return
                outcome["result"] = result
            wake.set()

        # In this request's context: the helper's log lines carry its request id.
        threading.Thread(target=contextvars.copy_context().run, args=(run,), name="relay-upstream-headers",
                         daemon=True).start()
        unregister = cancel.on_cancel(wake.set)
        try:
            yield WAITING
            while not wake.wait(cancel.idle_after):
                yield IDLE
        finally:
            unregister()
            with settled:
                result = outcome.get("result")
                if result is None:
                    outcome["abandoned"] = True
        if isinstance(result, BaseException):
            raise result
        if cancel.is_set() and result is not None:
            result.close()
            return None
        return result

    def _prepared(self, url: str, headers: dict[str, str], body: dict[str, Any]) -> requests.PreparedRequest:
        """The POST, from a request prepared once per URL with the session's settings: what
        `session.post` does on every call (merging them, parsing the URL) was a quarter of
        its CPU (~90 of ~370 µs per call against the bench's upstream)."""
        template = self._templates.get(url)
        if template is None:
            template = self.session.prepare_request(requests.Request("POST", url))
            if len(self._templates) < MAX_PREPARED_URLS:  # URLs that name a model are the client's
                self._templates[url] = template
        request = template.copy()
        request.headers.update(headers)
        request.prepare_body(json.dumps(body), None)
        return request

    def _error_from_response(self, response: requests.Response) -> ProviderError:
        try:
            raw = response.raw.read(MAX_ERROR_BODY, decode_content=True) or b""
        except Exception:
            raw = b""
        retry_after = retry_after_from_headers(response.headers)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        detail, body_delay = self.error_message(body)
        if retry_after is None:
            retry_after = body_delay
        status = response.status_code
        # Not the provider's JSON error: an HTML page from a gateway or proxy in between.
        # Either way the upstream's words (which may name internal hosts, or echo a key) go to
        # the log; the caller gets ours.
        log.warning("%s answered %s: %s", self.name, status, detail if detail else repr(raw[:500]))
        should_retry = response.headers.get("x-should-retry")
        retryable = status in RETRYABLE_STATUS if should_retry is None else should_retry == "true"
        kind = {401: "upstream_auth", 403: "upstream_auth", 429: "upstream_rate_limited"}.get(status, "upstream_error")
        return ProviderError(kind, refusal_message(self.name, status), status, retryable, retry_after,
                             detail=detail)


def stream_error(body: Any, provider: str) -> ProviderError:
    """An error reported inside a 200 stream (OpenAI `{"error"}`, Anthropic `event: error`)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = err.get("message") or err.get("type") or "error"
        kind = err.get("type") or err.get("status") or "error"
    else:
        message, kind = (str(err) if err else "error"), "error"
    log.warning("%s stream error (%s): %s", provider, kind, message)
    retryable = kind in ("overloaded_error", "rate_limit_error", "server_error", "api_error", "UNAVAILABLE",
                         "INTERNAL", "RESOURCE_EXHAUSTED")
    return ProviderError("upstream_error", f"{provider} reported an error during the answer", retryable=retryable,
                         detail=f"{kind}: {message}")


def cut_stream(provider: str, marker: str) -> ProviderError:
    """The connection ended before the provider's end marker: the answer is incomplete."""
    return ProviderError("upstream_disconnected", f"{provider} stream ended without {marker}")


def event_object(event: SseEvent) -> dict[str, Any] | None:
    """An SSE event's data as a JSON object; None for anything else, which a parser skips."""
    try:
        data = json.loads(event.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


