"""An upstream response as it arrives: its headers awaited on the caller's thread, its body
read as it comes, and its socket shut from another thread.

This is the one place that reaches below the public API of requests. The fast path
reads http.client's buffered socket reader directly (`raw._fp.fp.read1`) and decodes
chunked framing with `ChunkedDecoder`: one pass per network read however many tokens it
holds, which measured 2-3x the public path on one fast stream. Those are private
attributes of urllib3 and http.client, so they are checked once, at import, against real
objects of the installed versions; if a future version moves them, every body takes the
public path (`raw.stream`) instead, and the log says so once. The wait for the headers
(`send_awaiting_headers`) drives urllib3's connection pool step by step, with its private
methods, checked the same way (`HEADER_WAIT`).
"""

from __future__ import annotations

import errno
import http.client
import logging
import socket
import struct
import time
from collections.abc import Generator, Iterator
from typing import Any

import requests
import urllib3
from urllib3.connection import BaseSSLError, _wrap_proxy_error
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.proxy import connection_requires_http_tunnel
from urllib3.util.ssl_match_hostname import CertificateError
from urllib3.util.ssltransport import SSLTransport
from urllib3.util.timeout import Timeout
from urllib3.util.url import _encode_target, parse_url

from app.decoders import ChunkedDecoder
from app.gevent_native import unpatched
from app.providers.domain import IDLE, WAITING, Cancellation, Idle

logger = logging.getLogger("llm_sse_relay.upstream")

# A read that waits holds a buffer of the size it asked for (BufferedReader.read1 allocates
# it before the recv), and a stream spends nearly all its life waiting for the next token:
# 64 kB per open stream measured with tracemalloc, most of what a stream cost. So a read
# asks for twice what the last one brought, between these bounds: a token or two (a few
# hundred bytes each) while a model is speaking at its pace, the whole 64 kB that keeps
# one fast stream at one read per network read when tokens pile up.
READ_MIN = 4096
READ_MAX = 65536


def private_reads_available() -> bool:
    """Whether this urllib3 and http.client still have what the fast path reads."""
    left, right = socket.socketpair()
    try:
        inner = http.client.HTTPResponse(left)
        outer = urllib3.response.HTTPResponse(body=inner, preload_content=False)
        socket_io = getattr(getattr(inner, "fp", None), "raw", None)
        return (getattr(outer, "_fp", None) is inner and hasattr(getattr(inner, "fp", None), "read1")
                and hasattr(outer, "release_conn") and hasattr(outer, "chunked")
                and getattr(socket_io, "_sock", None) is left and hasattr(socket_io, "_timeout_occurred"))
    except Exception:
        return False
    finally:
        left.close()
        right.close()


FAST_READS = private_reads_available()
if not FAST_READS:
    logger.warning("urllib3 %s no longer has the attributes the fast upstream reader uses; "
                   "reading upstream bodies through the public (slower) path", getattr(urllib3, "__version__", "?"))


def iter_body(response: requests.Response, idle_after: float | None = None,
              read_timeout: float | None = None) -> Iterator[bytes]:
    """Body bytes as they arrive, one network read at a time (chunked framing removed).

    With `idle_after`, an empty `b""` comes every `idle_after` seconds of silence (the
    caller's chance to send a heartbeat) until `read_timeout` of silence, which raises
    `ReadTimeoutError` as the socket's own timeout would. Only the fast path has these
    ticks; the public one waits in one read, up to the read timeout.
    """
    raw = response.raw
    identity = raw.headers.get("content-encoding", "identity").lower() in ("", "identity")
    if FAST_READS and raw.chunked and identity:
        socket_reader = getattr(getattr(raw, "_fp", None), "fp", None)
        if socket_reader is not None:
            return _iter_chunked(raw, socket_reader, idle_after, read_timeout)
    return public_iter_body(raw)


def public_iter_body(raw: urllib3.response.HTTPResponse) -> Iterator[bytes]:
    """The documented way: urllib3 yields whatever each read returns (no waiting for a full buffer)."""
    if raw.chunked and raw.supports_chunked_reads():
        return raw.read_chunked(decode_content=True)
    return iter(lambda: raw.read1(65536, decode_content=True), b"")


def _iter_chunked(raw: Any, socket_reader: Any, idle_after: float | None,
                  read_timeout: float | None) -> Iterator[bytes]:
    decoder = ChunkedDecoder()
    socket_io = socket_reader.raw
    sock = socket_io._sock
    ticking = idle_after is not None and read_timeout is not None and idle_after < read_timeout
    tick, limit = idle_after or 0.0, read_timeout or 0.0  # read only while ticking, when both are set
    # On a native thread and plain TCP, the kernel times the wait (SO_RCVTIMEO on a blocking
    # socket): one recv() per read. A Python timeout polls before every recv: a second system
    # call, and a second take of the GIL among hundreds of mod_wsgi threads.
    kernel_timer = ticking and type(sock) is _NativeSocket
    if kernel_timer:
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(tick))
    elif ticking:
        sock.settimeout(tick)
    last_data = time.monotonic()
    size = READ_MIN
    while not decoder.done:
        try:
            data = socket_reader.read1(size)
        except TimeoutError:
            if not ticking:
                raise
            # SocketIO refuses every read after a timeout, in case a read was cut half-way;
            # recv() either returns data or times out having taken none, so reading on is safe.
            socket_io._timeout_occurred = False
            data = None
        if data is None or (not data and kernel_timer and _nothing_yet(sock)):  # a tick of silence
            if time.monotonic() - last_data >= limit:
                # What urllib3 raises for a read timeout, so callers handle one kind; urllib3 names
                # the pool in it, and no pool is at hand here (its message is all anyone reads).
                raise ReadTimeoutError(None, None, f"no data for {limit:g} s")  # type: ignore[arg-type]
            yield b""
            continue
        if not data:
            raise ProtocolError("the connection closed in the middle of a chunked body")
        if ticking:
            last_data = time.monotonic()
        size = min(max(2 * len(data), READ_MIN), READ_MAX)
        body = decoder.decode(data)
        if body:
            yield body
    if kernel_timer:  # as urllib3 left it, for the next request on this connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
    if ticking:
        sock.settimeout(read_timeout)
    # The body ended exactly: the connection may serve the next request (no new TLS handshake).
    if raw.headers.get("connection", "").lower() != "close":
        raw.release_conn()


_NativeSocket = unpatched("socket", "socket")


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


def _nothing_yet(sock: socket.socket) -> bool:
    """After an empty read under SO_RCVTIMEO: True when that was the timer, False at EOF."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection


def shut(response: requests.Response) -> None:
    """Shut the upstream socket so a read blocked in another thread returns now.

    `close()` alone does not wake a thread blocked in recv() on Linux; shutdown does,
    and when the response is closed the provider gets a reset, so it stops generating (and
    billing) at once.
    """
    raw = response.raw
    connection = getattr(raw, "connection", None)  # public in urllib3 2 while the body is unread
    candidates = [getattr(connection, "sock", None)]
    if FAST_READS:  # after a partial read urllib3 may have let go of it: the reader's socket
        candidates.append(getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None))
    for sock in map(tls_inside_tls, candidates):
        if isinstance(sock, socket.socket):
            abort(sock)
            return
    response.close()


def tls_inside_tls(sock: Any) -> Any:
    """The socket under urllib3's SSLTransport (TLS to the upstream inside TLS to an HTTPS
    proxy), which is no `socket.socket` itself; anything else as it is."""
    inner = getattr(sock, "socket", None) if isinstance(sock, SSLTransport) else None
    return inner if inner is not None else sock


def abort(sock: socket.socket) -> None:
    """Shut `sock` for both directions, with a reset when it is closed: a read blocked on it
    in another thread returns now.

    A reset, not a polite FIN: an upstream writing into a full window (its reader stopped
    reading) would never see a FIN, only keep probing the orphaned socket for a minute, and
    keep generating (and billing) meanwhile.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- the response headers, awaited on the caller's thread

def header_wait_available() -> bool:
    """Whether this urllib3 still has what `SentRequest` drives its pool with."""
    pool_methods = ("_get_conn", "_put_conn", "_validate_conn", "_prepare_proxy", "_raise_timeout", "_get_timeout")
    return (FAST_READS and all(callable(getattr(HTTPConnectionPool, name, None)) for name in pool_methods)
            and callable(getattr(requests.adapters.HTTPAdapter, "get_connection_with_tls_context", None))
            and callable(getattr(urllib3.connection.HTTPConnection, "getresponse", None)))


HEADER_WAIT = header_wait_available()
if not HEADER_WAIT:
    logger.warning("urllib3 %s no longer has what the upstream call waits for headers with; a thread waits "
                   "for each call's headers instead", getattr(urllib3, "__version__", "?"))

# What HTTPConnectionPool.urlopen discards a connection for (and turns into its own errors).
_URLOPEN_FAILURES = (Urllib3Timeout, http.client.HTTPException, OSError, ProtocolError, BaseSSLError, SSLError,
                     CertificateError, ProxyError)


class SentRequest:
    """A request sent on a connection of its pool, its response not read yet.

    `HTTPConnectionPool.urlopen` (urllib3 2.x), cut where it waits for the response: what
    it does up to `getresponse()` (proxy headers or tunnel, connect, TLS, send) happens
    here, its errors kept as urlopen would raise them; `wait` waits for the first byte of
    the response in slices; `urlopen` (which `HeaderWaitAdapter.send` calls, so requests
    maps the errors and builds the response as it always does) reads the headers. One
    attempt: requests' adapter retries nothing (`Retry(0, read=False)`).
    """

    def __init__(self, adapter: requests.adapters.HTTPAdapter, request: requests.PreparedRequest,
                 verify: Any, proxies: Any, timeout: Timeout) -> None:
        self.error: BaseException | None = None
        self.error_at = "pool"  # where requests' adapter.send meets `error`
        self.conn: Any = None
        self.reader: Any = None
        self.timed_out = False  # the read timeout ran out before the response began
        self.read_error: OSError | None = None  # what `wait` met, for getresponse() to meet again
        self.method = request.method or "POST"
        self.retries = adapter.max_retries
        self.pool: Any = None  # an HTTP(S)ConnectionPool: its private methods are not in its type
        try:
            self.pool = adapter.get_connection_with_tls_context(request, verify, proxies=proxies)
            self.error_at = "verify"
            adapter.cert_verify(self.pool, request.url, verify, None)  # type: ignore[no-untyped-call]
            self.error_at = "urlopen"
            self._send(request, adapter.request_url(request, proxies), timeout)
        except Exception as exc:
            self.error = exc

    @property
    def waits(self) -> bool:
        return self.error is None and self.conn is not None and self.conn.sock is not None

    def _send(self, request: requests.PreparedRequest, url: str, timeout: Timeout) -> None:
        pool = self.pool
        if url.startswith("/"):
            self.url, scheme = _encode_target(url), None
        else:
            parsed = parse_url(url)
            self.url, scheme = parsed._replace(fragment=None).url, parsed.scheme
        headers: Any = request.headers
        tunnel = connection_requires_http_tunnel(pool.proxy, pool.proxy_config, scheme)
        if not tunnel:
            headers = headers.copy()
            headers.update(pool.proxy_headers)
        self.timeout = pool._get_timeout(timeout)
        conn = self.conn = pool._get_conn()
        try:
            conn.timeout = self.timeout.connect_timeout
            if pool.proxy is not None and tunnel and conn.is_closed:
                try:
                    pool._prepare_proxy(conn)
                except (BaseSSLError, OSError, TimeoutError) as e:
                    pool._raise_timeout(err=e, url=pool.proxy.url, timeout_value=conn.timeout)
                    raise
            # HTTPConnectionPool._make_request, up to getresponse()
            pool.num_requests += 1
            conn.timeout = Timeout.resolve_default_timeout(self.timeout.connect_timeout)
            try:
                try:
                    pool._validate_conn(conn)
                except (TimeoutError, BaseSSLError) as e:
                    pool._raise_timeout(err=e, url=self.url, timeout_value=conn.timeout)
                    raise
            except (OSError, NewConnectionError, Urllib3Timeout, BaseSSLError, CertificateError, SSLError) as e:
                new_e: Exception = SSLError(e) if isinstance(e, (BaseSSLError, CertificateError)) else e
                if conn.proxy and not conn.has_connected_to_proxy:
                    new_e = _wrap_proxy_error(new_e, conn.proxy.scheme)
                raise new_e from e
            chunked = not (request.body is None or "Content-Length" in request.headers)
            try:
                conn.request(self.method, self.url, body=request.body, headers=headers, chunked=chunked,
                             preload_content=False, decode_content=False, enforce_content_length=True)
            except BrokenPipeError:  # the server may have answered before closing: read on
                pass
            except OSError as e:
                if e.errno not in (errno.EPROTOTYPE, errno.ECONNRESET):
                    raise
        except BaseException as exc:
            self._fail(exc)

    def wait(self, seconds: float) -> bool:
        """Up to `seconds` for the response to begin; True once it has (or the connection ended).

        The wait is a read into the buffer http.client then parses the response from (not a
        poll of the socket): over TLS 1.3 the server's session tickets make the socket
        readable long before the answer, and the read takes them in and waits on."""
        sock = self.conn.sock
        if self.reader is None:
            self.reader = sock.makefile("rb")  # what http.client's response would make
        sock.settimeout(seconds)
        try:
            self.reader.peek(1)
        except TimeoutError:
            # SocketIO refuses every read after a timeout, in case one was cut half-way; this
            # one took nothing (a timeout in recv, or in SSL_read's wait for a whole record).
            self.reader.raw._timeout_occurred = False
            return False
        except OSError as exc:  # raised where getresponse() would have met it
            self.read_error = exc
        return True

    def abort(self) -> None:
        """From any thread: wakes a `wait` (it returns True, with nothing to read)."""
        sock = tls_inside_tls(getattr(self.conn, "sock", None))
        if isinstance(sock, socket.socket):
            abort(sock)

    def discard(self) -> None:
        """Not read, and never back in the pool half-used: closed (with a reset) and forgotten."""
        if self.conn is None:  # never taken, failed (already closed), or the response's
            return
        self.abort()
        if self.reader is not None:
            self.reader.close()
        self.conn.close()
        self.pool._put_conn(None)
        self.conn = self.reader = None

    def urlopen(self, **_: Any) -> Any:
        """The response, its headers read; or the error urlopen would have raised."""
        if self.error is not None:
            raise self.error
        conn, pool = self.conn, self.pool
        read_timeout = self.timeout.read_timeout
        try:
            try:
                if not conn.is_closed:
                    conn.timeout = read_timeout
                if self.timed_out:  # as the first recv of getresponse() would have
                    raise TimeoutError("timed out")
                if self.read_error is not None:
                    raise self.read_error
                conn.response_class = self._primed_response
                try:
                    response = conn.getresponse()
                finally:
                    del conn.response_class
            except (BaseSSLError, OSError) as e:
                pool._raise_timeout(err=e, url=self.url, timeout_value=read_timeout)
                raise
        except BaseException as exc:
            self._fail(exc)
        response.retries = self.retries
        response._connection = conn
        response._pool = pool
        self.conn = self.reader = None  # the response's now
        return response

    def _primed_response(self, sock: Any, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        """http.client's response, reading from the buffer `wait` filled (it makes its own)."""
        return http.client.HTTPResponse(_MadeFile(self.reader), *args, **kwargs)  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        """As urlopen fails: the connection discarded, the error turned into urllib3's."""
        conn = self.conn
        if self.reader is not None:
            self.reader.close()
        conn.close()
        self.pool._put_conn(None)
        self.conn = None
        if not isinstance(exc, _URLOPEN_FAILURES):
            raise exc
        new_e: Exception = SSLError(exc) if isinstance(exc, (BaseSSLError, CertificateError)) else exc
        if (isinstance(new_e, (OSError, NewConnectionError, Urllib3Timeout, SSLError, http.client.HTTPException))
                and conn.proxy and not conn.has_connected_to_proxy):
            new_e = _wrap_proxy_error(new_e, conn.proxy.scheme)
        elif isinstance(new_e, (OSError, http.client.HTTPException)):
            new_e = ProtocolError("Connection aborted.", new_e)
        # Raises: MaxRetryError, or a read error as it is (requests' Retry(0, read=False)).
        self.retries.increment(self.method, self.url, error=new_e, _pool=self.pool, _stacktrace=exc.__traceback__)
        raise MaxRetryError(self.pool, self.url, new_e) from exc  # only if someone allowed retries


class _MadeFile:
    """A socket to http.client.HTTPResponse, whose only use of it is `makefile("rb")`."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def makefile(self, mode: str) -> Any:
        return self.reader


class HeaderWaitAdapter(requests.adapters.HTTPAdapter):
    """requests' HTTP adapter, which also finishes a `SentRequest`: its `send` (unchanged)
    then reads the response through it, turning its errors into requests' and building the
    `Response` exactly as for any other call."""

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: Any,
                                        proxies: Any = None, cert: Any = None) -> Any:
        sent = getattr(request, "sent_request", None)
        if sent is None:
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        if sent.error is not None and sent.error_at == "pool":
            raise sent.error
        return sent

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        if not isinstance(conn, SentRequest):
            super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        elif conn.error is not None and conn.error_at == "verify":
            raise conn.error


def send_awaiting_headers(session: requests.Session, request: requests.PreparedRequest,
                          timeout: tuple[float, float], cancel: Cancellation) -> Generator[Idle, None,
                                                                                             requests.Response | None]:
    """`session.send(request, stream=True)`, with the wait for the response headers on this
    thread, in slices of `cancel.idle_after`: `WAITING` before the connect, then `IDLE` after
    each slice. None when cancelled first (the connection closed, not returned to the pool).

    The connect and the send of the request block, up to the connect timeout each, as they
    would on any thread."""
    adapter = session.get_adapter(request.url or "")
    if not isinstance(adapter, HeaderWaitAdapter) or cancel.idle_after is None:
        raise TypeError("send_awaiting_headers needs a HeaderWaitAdapter and cancel.idle_after")
    connect_timeout, read_timeout = timeout
    yield WAITING
    sent = SentRequest(adapter, request, session.verify, session.proxies,
                       Timeout(connect=connect_timeout, read=read_timeout))
    answered = False
    try:
        if sent.waits:
            unregister = cancel.on_cancel(sent.abort)
            try:
                deadline = time.monotonic() + read_timeout
                while not cancel.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        sent.timed_out = True
                        break
                    if sent.wait(min(cancel.idle_after, left)):
                        break
                    yield IDLE
            finally:
                unregister()
            if cancel.is_set():
                return None
        request.sent_request = sent  # type: ignore[attr-defined]  # for HeaderWaitAdapter
        response = session.send(request, stream=True, timeout=timeout, verify=session.verify,
                                proxies=session.proxies)
        answered = True
        return response
    finally:
        if not answered:  # cancelled, closed, or failed: whatever is still open goes
            sent.discard()
