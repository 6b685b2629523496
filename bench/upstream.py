"""A fast fake OpenAI upstream for the benchmark: asyncio, cheap per connection.

Each token's text is `t<send time in ns>;` so the load generator can compute the
latency the relay added. Paced at R tokens/s for K tokens per stream (R=0: as fast as
the socket takes them). Counts streams started, completed and aborted.

    python bench/upstream.py --port 9100 --rate 20 --tokens 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n")
PREFIX = b'data: {"id":"b","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t'
SUFFIX = b';"},"finish_reason":null}]}\n\n'
FINISH = (b'data: {"id":"b","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
          b'"finish_reason":"stop"}]}\n\n'
          b'data: {"id":"b","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d,"total_tokens":%d}}\n\n'
          b"data: [DONE]\n\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    def __init__(self, rate: float, tokens: int) -> None:
        self.rate = rate
        self.tokens = tokens
        self.started = self.completed = self.aborted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /stats"):
                body = json.dumps({"started": self.started, "completed": self.completed,
                                   "aborted": self.aborted}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
                return
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            self.started += 1
            await self.stream(writer)
            self.completed += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.aborted += 1
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        interval = 1.0 / self.rate if self.rate else 0.0
        start = time.monotonic()
        for i in range(self.tokens):
            if interval:
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            writer.write(chunk(PREFIX + str(time.time_ns()).encode() + SUFFIX))
            if not interval or i % 64 == 63:
                await writer.drain()
            if writer.is_closing():
                raise ConnectionError("client left")
        writer.write(chunk(FINISH % (self.tokens, self.tokens + 1)) + b"0\r\n\r\n")
        await writer.drain()


async def main(port: int, rate: float, tokens: int) -> None:
    upstream = Upstream(rate, tokens)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    print(f"fake upstream on 127.0.0.1:{port} ({rate} tok/s x {tokens})", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: F401  (not required; plain asyncio is the default)
    except ImportError:
        pass
    asyncio.run(main(args.port, args.rate, args.tokens))
