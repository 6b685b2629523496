"""Reading an upstream response body as it arrives, and shutting it from another thread.

This is the one place that reaches below the public API of requests. The fast path
reads http.client's buffered socket reader directly (`raw._fp.fp.read1`) and decodes
chunked framing with `ChunkedDecoder`: one pass per network read however many tokens it
holds, which measured 2-3x the public path on one fast stream. Those are private
attributes of urllib3 and http.client, so they are checked once, at import, against real
objects of the installed versions; if a future version moves them, every body takes the
public path (`raw.stream`) instead, and the log says so once.
"""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from app.decoders import ChunkedDecoder
from app.gevent_native import unpatched

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
    for sock in candidates:
        if isinstance(sock, socket.socket):
            try:
                # Closed with a reset, not a polite FIN: an upstream writing into a full window
                # (its reader stopped reading) would never see a FIN, only keep probing the
                # orphaned socket for a minute, and keep generating meanwhile.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
    response.close()
