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
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from urllib3.exceptions import ProtocolError

from app.decoders import ChunkedDecoder

log = logging.getLogger("llm_sse_relay.upstream")


def private_reads_available() -> bool:
    """Whether this urllib3 and http.client still have what the fast path reads."""
    left, right = socket.socketpair()
    try:
        inner = http.client.HTTPResponse(left)
        outer = urllib3.response.HTTPResponse(body=inner, preload_content=False)
        return (getattr(outer, "_fp", None) is inner and hasattr(getattr(inner, "fp", None), "read1")
                and hasattr(outer, "release_conn") and hasattr(outer, "chunked"))
    except Exception:
        return False
    finally:
        left.close()
        right.close()


FAST_READS = private_reads_available()
if not FAST_READS:
    log.warning("urllib3 %s no longer has the attributes the fast upstream reader uses; "
                "reading upstream bodies through the public (slower) path", urllib3.__version__)


def iter_body(response: requests.Response) -> Iterator[bytes]:
    """Body bytes as they arrive, one network read at a time (chunked framing removed)."""
    raw = response.raw
    identity = raw.headers.get("content-encoding", "identity").lower() in ("", "identity")
    if FAST_READS and raw.chunked and identity:
        socket_reader = getattr(getattr(raw, "_fp", None), "fp", None)
        if socket_reader is not None:
            return _iter_chunked(raw, socket_reader)
    return public_iter_body(raw)


def public_iter_body(raw: Any) -> Iterator[bytes]:
    """The documented way: urllib3 yields whatever each read returns (no waiting for a full buffer)."""
    if raw.chunked and raw.supports_chunked_reads():
        return raw.read_chunked(decode_content=True)
    return iter(lambda: raw.read1(65536, decode_content=True), b"")


def _iter_chunked(raw: Any, socket_reader: Any) -> Iterator[bytes]:
    decoder = ChunkedDecoder()
    while not decoder.done:
        data = socket_reader.read1(65536)
        if not data:
            raise ProtocolError("the connection closed in the middle of a chunked body")
        body = decoder.decode(data)
        if body:
            yield body
    # The body ended exactly: the connection may serve the next request (no new TLS handshake).
    if raw.headers.get("connection", "").lower() != "close":
        raw.release_conn()


def shut(response: requests.Response) -> None:
    """Shut the upstream socket so a read blocked in another thread returns now.

    `close()` alone does not wake a thread blocked in recv() on Linux; shutdown does,
    and the provider sees its connection closed, so it stops generating (and billing).
    """
    raw = response.raw
    connection = getattr(raw, "connection", None)  # public in urllib3 2 while the body is unread
    candidates = [getattr(connection, "sock", None)]
    if FAST_READS:  # after a partial read urllib3 may have let go of it: the reader's socket
        candidates.append(getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None))
    for sock in candidates:
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
    response.close()
