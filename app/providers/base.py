"""What every provider shares: the normalized deltas, errors, cancellation, and the
HTTP upstream call (one `requests.Session`, `stream=True`, retries before the first
token, the socket shut the moment the stream is cancelled).

A provider adapter only says how to build its request, how to parse its stream's
events into deltas, and how to read its error bodies.
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
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from app.decoders import DecodeError, NdjsonDecoder, SseDecoder, SseEvent
from app.json_depth import MAX_DEPTH, json_nesting
from app.providers import upstream_body
from app.providers.upstream_body import iter_body, shut

log = logging.getLogger("llm_sse_relay.upstream")

# ---------------------------------------------------------------- normalized deltas


class Text:
    """A piece of answer text, exactly as the provider sent it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Usage:
    """Token counts so far: `input_tokens`, `output_tokens`, `total_tokens`, and
    `reasoning_tokens` (the part of the output spent thinking) only when the provider reports it."""

    __slots__ = ("usage",)

    def __init__(self, input_tokens: int | None, output_tokens: int | None, total: int | None = None,
                 reasoning_tokens: int | None = None) -> None:
        if total is None and input_tokens is not None and output_tokens is not None:
            total = input_tokens + output_tokens
        self.usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": total}
        if reasoning_tokens is not None:
            self.usage["reasoning_tokens"] = reasoning_tokens


class Finish:
    """Why the model stopped, normalized: stop, length, tool_calls, content_filter, …"""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class ToolCall:
    """A complete tool call the model asked for; `arguments` is the raw JSON text.

    `signature`, when set, is `{"provider": <provider name>, "value": <opaque text>}`: a
    signature the provider attached to this call (Gemini's `thoughtSignature`) that must go
    back unchanged, on the same call, in the next request to that provider, and to no other.
    """

    __slots__ = ("id", "name", "arguments", "signature")

    def __init__(self, id: str, name: str, arguments: str, signature: dict[str, str] | None = None) -> None:
        self.id = id
        self.name = name
        self.arguments = arguments
        self.signature = signature


class Reasoning:
    """A piece of the model's visible reasoning (thinking, or a reasoning summary), exactly as
    the provider sent it. Never part of the answer text: it goes out as its own event."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class Signed:
    """Reasoning state a provider requires back unchanged with the turn it belongs to:
    Anthropic `thinking` (with its `signature`) and `redacted_thinking` blocks, a Gemini
    `thoughtSignature` on a text part, an OpenAI Responses `reasoning` item. `item` is the
    provider's own JSON object, kept exactly as received; `provider` is the name of the
    provider that produced it: it is sent back to that provider only, and dropped (never
    forged) when the next turn goes to another one."""

    __slots__ = ("provider", "item")

    def __init__(self, provider: str, item: dict[str, Any]) -> None:
        self.provider = provider
        self.item = item


class Meta:
    """Anything else worth telling the reader (retries, rate limits) as a `meta` event."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data


class Idle:
    """For the thread driving a stream (`Cancellation.idle_after` set), never otherwise:
    `WAITING`, the provider is about to block (what it produced may go out now), or `IDLE`,
    nothing arrived for `idle_after` seconds (time for a heartbeat). Carries nothing else."""

    __slots__ = ("silent",)

    def __init__(self, silent: bool) -> None:
        self.silent = silent


WAITING = Idle(False)
IDLE = Idle(True)

Delta = Text | Reasoning | Signed | Usage | Finish | ToolCall | Meta | Idle


class ProviderError(Exception):
    """An upstream failure, in the shape of the protocol's `error` event.

    `message` is ours and goes to clients; `detail` is what the upstream said (its error
    text, an in-stream error's type), which may name internal hosts or echo credentials: it
    goes to the log only (scrubbed there), never into an event, a body or a record.
    """

    def __init__(
        self,
        type: str,
        message: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.detail = detail

    @property
    def upstream_fault(self) -> bool:
        """Whether another provider may answer where this one failed: it could not be reached,
        timed out, broke off, was overloaded (429, 5xx, an in-stream server error). A refusal
        the request caused (400, 404, 422, a blocked prompt) or this server's credentials (401,
        403) would fail the same way elsewhere, or must not be routed around."""
        if self.status is not None:
            return self.status in (408, 429) or self.status >= 500
        return self.type in UPSTREAM_FAULTS or (self.type == "upstream_error" and self.retryable)

    def as_event(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.status is not None:
            data["status"] = self.status
        return data


# Failures of the connection or the stream itself, whoever the provider.
UPSTREAM_FAULTS = frozenset({"upstream_timeout", "upstream_unreachable", "upstream_disconnected",
                             "upstream_protocol_error"})


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


# ---------------------------------------------------------------- the request


@dataclass
class Task:
    """One normalized chat request, whatever the provider.

    `messages` are `{role, content}` with roles system, user and assistant, plus the
    provider-neutral form of tool exchanges that each adapter translates to its wire format:
    an assistant turn `{"role": "assistant", "content", "tool_calls": [{"id", "name",
    "arguments"}]}` (arguments as JSON text) and its results `{"role": "tool",
    "tool_call_id", "name", "content", "is_error"?}`. `tools` are `{name, description,
    parameters}`; `tool_choice` is "auto", "none", "required" or a tool's name.

    What today's models add (each adapter translates it, or leaves out what its wire lacks):
    - a user message's `content` may be a list of parts: `{"type": "text", "text"}` and
      `{"type": "image", "media_type", "data"}` (base64, already validated) or
      `{"type": "image", "url"}` (an https URL the relay never fetches itself);
    - an assistant turn may carry `"reasoning"` (its visible thinking, kept for the record,
      never sent back as text), `"signed": [{"provider", "item"}]` (the `Signed` deltas of
      that turn, in the order they came) and tool calls with a `"signature"` (see
      `ToolCall`); an adapter sends back only what its own provider name produced;
    - `reasoning` is the requested effort: "low", "medium", "high" or None (the provider's
      default, usually no visible reasoning).
    """

    messages: list[dict[str, Any]]
    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | None = None
    stop: list[str] = field(default_factory=list)
    reasoning: str | None = None


class Cancellation:
    """Stops a generation from any thread: sets a flag and runs the registered aborts.

    `idle_after`, when set, asks the provider not to block longer than that: while it waits
    (for response headers, a retry, the next bytes) it yields `IDLE` every `idle_after`
    seconds, so the reader's own thread can drive the stream and still send heartbeats.
    """

    def __init__(self, idle_after: float | None = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None
        self.idle_after = idle_after

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def cancel(self, reason: str = "cancelled") -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # an abort that fails must not stop the others
                pass

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` on cancel (now, if already cancelled); returns an unregister."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._discard(callback)
        callback()
        return lambda: None

    def _discard(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


class Provider:
    """A source of answers. `stream(task, cancel)` yields deltas until done."""

    name = "provider"
    default_model = ""
    models: tuple[str, ...] = ()
    # Whether the provider takes an image by its https URL (fetching it itself); one that does
    # not gets images as bytes only, and a URL is refused before the call (app/images.py).
    takes_image_urls = True

    policy: UpstreamPolicy | None = None  # retry bounds, for providers that retry

    def attempt(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        """One call, no retries (what failover and a request's retry budget build on)."""
        return self.stream(task, cancel)

    @property
    def configured(self) -> bool:
        return True

    @property
    def idles(self) -> bool:
        """True when, with `cancel.idle_after` set, `stream` yields `WAITING` before it blocks
        and `IDLE` at least every `idle_after` seconds while blocked: then a reader's thread
        may drive it."""
        return False

    def stream(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        raise NotImplementedError


def idle_wait(cancel: Cancellation, seconds: float) -> Generator[Idle, None, bool]:
    """Wait `seconds` unless cancelled (returns True then). With `idle_after` set: `WAITING`
    first, then `IDLE` every `idle_after` seconds of the wait."""
    deadline = time.monotonic() + seconds
    if cancel.idle_after is not None:
        yield WAITING
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if cancel.wait(left if cancel.idle_after is None else min(left, cancel.idle_after)):
            return True
        if cancel.idle_after is not None and deadline - time.monotonic() > 0:
            yield IDLE


def system_text(task: Task) -> str | None:
    """For APIs with one top-level system prompt (Anthropic, Gemini): the task's system prompt
    and any system messages, joined."""
    parts = ([task.system] if task.system else []) + [m["content"] for m in task.messages if m.get("role") == "system"]
    return "\n\n".join(parts) or None


def event_object(event: SseEvent) -> dict[str, Any] | None:
    """An SSE event's data as a JSON object; None for anything else, which a parser skips."""
    try:
        data = json.loads(event.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def parsed_arguments(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as an object (an invalid string becomes {}, and so does one nested
    past what any client may send: a model wrote it, and the parser must not recurse without bound)."""
    if json_nesting(arguments or "") > MAX_DEPTH:
        return {}
    try:
        value = json.loads(arguments or "{}")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- HTTP upstream


@dataclass
class UpstreamPolicy:
    """Timeouts and retry bounds of the upstream call (from Settings)."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_retries: int = 2
    retry_base: float = 0.5
    retry_max_wait: float = 30.0
    pool_size: int = 256


RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
MAX_ERROR_BODY = 64 * 1024


def retry_after_from_headers(headers: Any) -> float | None:
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


def retrying(provider: Provider, task: Task, cancel: Cancellation, budget: RetryBudget) -> Iterator[Delta]:
    """`provider`'s answer, its failed calls repeated while no text has been yielded, at most
    `provider.policy.max_retries` times and while `budget` (the request's) lasts."""
    policy = provider.policy
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
    adapter = requests.adapters.HTTPAdapter(pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class HttpProvider(Provider):
    """Base of the adapters that call an HTTP API. Subclasses fill in the wire format."""

    framing = "sse"  # or "ndjson"
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

    def stream_parser(self, task: Task) -> Any:
        """A fresh object with `feed(event) -> list[Delta]` and `finish() -> list[Delta]`."""
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
        if cancel.is_set():
            return
        url, headers, body = self.build_request(task)
        # identity: a gzip decoder would hold back text until it has a full block.
        headers = {"Accept-Encoding": "identity", "Content-Type": "application/json", **headers}
        try:
            response = yield from self._send(url, headers, body, cancel)
        except requests.Timeout as exc:
            log.warning("%s: no answer from %s: %s", self.name, url, exc)
            raise ProviderError("upstream_timeout", f"{self.name} did not answer in time", retryable=True) from exc
        except requests.RequestException as exc:
            # The exception names hosts, ports and urllib3's classes: for the log only.
            log.warning("%s: cannot reach %s: %s", self.name, url, exc)
            raise ProviderError("upstream_unreachable", f"cannot reach {self.name}", retryable=True) from exc
        if response is None:  # cancelled while waiting for the response headers
            return
        unregister = cancel.on_cancel(lambda: shut(response))
        try:
            if response.status_code >= 400:
                raise self._error_from_response(response)
            limits = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith(RATE_LIMIT_PREFIXES)}
            if limits:
                yield Meta({"rate_limit": limits})
            parser = self.stream_parser(task)
            decoder = SseDecoder() if self.framing == "sse" else NdjsonDecoder()
            waits = cancel.idle_after is not None
            try:
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
            except (ReadTimeoutError, requests.Timeout, TimeoutError) as exc:
                if cancel.is_set():
                    return
                raise ProviderError(
                    "upstream_timeout",
                    f"{self.name} sent nothing for {self.policy.read_timeout:g} s",
                ) from exc
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
        finally:
            unregister()
            response.close()

    def _send(self, url: str, headers: dict[str, str], body: dict[str, Any],
              cancel: Cancellation) -> Generator[Idle, None, requests.Response | None]:
        """POST the request; the response once its headers are in (None if cancelled before).

        With `idle_after` set, the wait for the headers (a model loading can take a minute)
        happens on a short-lived helper thread while this one yields `IDLE`.
        """
        def send() -> requests.Response:
            return self.session.send(self._prepared(url, headers, body), stream=True,
                                     timeout=(self.policy.connect_timeout, self.policy.read_timeout),
                                     verify=self.session.verify, proxies=self.session.proxies)

        if cancel.idle_after is None:
            return send()
        outcome: dict[str, Any] = {}
        settled = threading.Lock()  # the helper hands the response over, or closes it when nobody waits
        wake = threading.Event()

        def run() -> None:
            try:
                result: Any = send()
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
