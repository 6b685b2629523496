"""The load generator: N concurrent SSE streams over raw asyncio sockets.

Per token it records arrival time minus the upstream's send stamp (the latency the
server under test added); per stream, time to first token and how it ended. Frames are
found by bytes search, not parsed as JSON, so the generator stays cheap at 40k events/s.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# A token's text is "t<ns>;" (in `"text"` from a relay, `"content"` from the upstream).
STAMP = re.compile(rb'"t(\d{19});')


class Dechunker:
    """HTTP/1.1 chunked transfer decoding, incremental (servers may re-chunk anywhere)."""

    def __init__(self) -> None:
        self.raw = b""
        self.left = 0  # bytes of the current chunk still to come
        self.skip = 0  # CRLF after a chunk still to drop
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self.raw += data
        out = []
        while self.raw:
            if self.skip:
                dropped = min(self.skip, len(self.raw))
                self.raw, self.skip = self.raw[dropped:], self.skip - dropped
                continue
            if self.left:
                piece = self.raw[: self.left]
                out.append(piece)
                self.raw, self.left = self.raw[len(piece):], self.left - len(piece)
                if not self.left:
                    self.skip = 2
                continue
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self.raw[:line_end].split(b";")[0] or b"0", 16)
            self.raw = self.raw[line_end + 2:]
            if size == 0:
                self.finished = True
                break
            self.left = size
        return b"".join(out)


@dataclass
class Result:
    started: int = 0
    completed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    ticket_ms: list[float] = field(default_factory=list)  # POST-SSE step 1 alone (part of TTFT)
    tokens: int = 0
    seconds: float = 0.0

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


async def _request(host: str, port: int, raw: bytes, timeout: float):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
    writer.write(raw)
    return reader, writer


async def _post_json(host: str, port: int, path: str, body: dict, timeout: float) -> dict:
    data = json.dumps(body).encode()
    raw = (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
           b"Connection: close\r\n\r\n%s" % (path.encode(), host.encode(), len(data), data))
    reader, writer = await _request(host, port, raw, timeout)
    try:
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if b" 201 " not in head.split(b"\r\n")[0] and b" 200 " not in head.split(b"\r\n")[0]:
        raise RuntimeError(head.split(b"\r\n")[0].decode())
    return json.loads(body)


async def one_stream(url: str, mode: str, result: Result, timeout: float, expected: int) -> None:
    """mode: "get" (GET ?prompt=), "postsse" (POST then GET stream_url), "openai" (the upstream)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    result.started += 1
    t0 = time.monotonic()
    try:
        if mode == "postsse":
            ticket = await _post_json(host, port, "/api/chat/streams",
                                      {"provider": "openai", "prompt": "bench"}, timeout)
            result.ticket_ms.append((time.monotonic() - t0) * 1000)
            path = ticket["stream_url"]
            raw = b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n" % (path.encode(), host.encode())
        elif mode == "openai":
            body = b'{"model":"m","messages":[{"role":"user","content":"bench"}],"stream":true}'
            raw = (b"POST /chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        else:
            raw = (b"GET /api/chat/stream?provider=openai&prompt=bench HTTP/1.1\r\nHost: %s\r\n"
                   b"Accept: text/event-stream\r\n\r\n" % host.encode())
        reader, writer = await _request(host, port, raw, timeout)
    except Exception as exc:
        result.fail(f"connect: {type(exc).__name__}")
        return
    tokens = 0
    done = False
    buffer = b""
    latencies = result.latencies_ms
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            result.fail(f"status: {head.split(b' ', 2)[1].decode()}")
            return
        dechunker = Dechunker() if b"chunked" in head.lower() else None
        while not done:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                break
            now_ns = time.time_ns()
            buffer += dechunker.feed(data) if dechunker else data
            start = 0
            for match in STAMP.finditer(buffer):
                if tokens == 0:
                    result.ttft_ms.append((time.monotonic() - t0) * 1000)
                tokens += 1
                latencies.append((now_ns - int(match.group(1))) / 1e6)
                start = match.end()
            if b"event: done" in buffer or b"[DONE]" in buffer:
                done = True
            if b"event: error" in buffer:
                result.fail("error event")
                return
            buffer = buffer[start:] if start else buffer[-4096:]
    except TimeoutError:
        result.fail("timeout")
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        result.fail(f"connection: {type(exc).__name__}")
    finally:
        writer.close()
        result.tokens += tokens
    if done and tokens == expected:
        result.completed += 1
    elif done:
        result.fail(f"tokens {tokens}/{expected}")
    elif not result.failures:
        result.fail("cut")


async def run_load(url: str, mode: str, streams: int, expected: int, ramp: float = 1.0,
                   timeout: float = 60.0) -> Result:
    """Open `streams` streams spread over `ramp` seconds and wait for all of them."""
    result = Result()
    t0 = time.monotonic()
    tasks = []
    for i in range(streams):
        tasks.append(asyncio.create_task(one_stream(url, mode, result, timeout, expected)))
        if ramp and streams > 1:
            delay = t0 + ramp * (i + 1) / streams - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    await asyncio.gather(*tasks)
    result.seconds = time.monotonic() - t0
    return result
