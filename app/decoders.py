"""Incremental decoders for upstream bytes: bytes -> lines -> SSE events.

Each decoder has the same two methods, `decode(data)` for the next network chunk and
`flush()` at end of stream, so they stack and test without sockets. Lines are cut on
bytes before any text decoding: a line break is ASCII, so a multi-byte UTF-8 character
split across chunks is always whole by the time its line is decoded.
"""

from __future__ import annotations


class DecodeError(ValueError):
    """The upstream sent something no valid stream contains (e.g. an endless line)."""


class ChunkedDecoder:
    """HTTP/1.1 chunked transfer coding: wire bytes -> body bytes, incrementally.

    One network read that carries several small chunks (several tokens) is decoded in
    one pass, instead of a readline and two reads per chunk in the HTTP client.
    `done` turns true after the last chunk and its trailer section.
    """

    __slots__ = ("_buffer", "_left", "_trailer", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # body bytes of the current chunk still to come (+2 for its CRLF)
        self._trailer = False
        self.done = False

    def decode(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out = []
        pos, end = 0, len(buffer)
        while pos < end and not self.done:
            if self._left > 0:
                take = min(self._left, end - pos)
                out.append(buffer[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = -2  # the CRLF after the data
                continue
            if self._left < 0:  # skip what is left of the CRLF after a chunk
                take = min(-self._left, end - pos)
                pos += take
                self._left += take
                continue
            line_end = buffer.find(b"\n", pos)
            if line_end < 0:
                if end - pos > 1024:
                    raise DecodeError("chunk size line too long")
                break
            line = buffer[pos:line_end].strip()
            pos = line_end + 1
            if self._trailer:
                if not line:
                    self.done = True
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise DecodeError(f"bad chunk size line {line[:40]!r}") from None
            if size == 0:
                self._trailer = True
            else:
                self._left = size
        self._buffer = buffer[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def flush(self) -> bytes:
        return b""


class LineDecoder:
    """Splits bytes into lines on CRLF, LF or lone CR, as the SSE spec's line rule says."""

    __slots__ = ("_buffer", "_trailing_cr", "max_line")

    def __init__(self, max_line: int = 8 * 1024 * 1024) -> None:
        self._buffer = b""
        self._trailing_cr = False
        self.max_line = max_line

    def decode(self, data: bytes) -> list[bytes]:
        if self._trailing_cr:
            # The previous chunk ended in CR; an LF now is the rest of that CRLF.
            self._trailing_cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if self._buffer:
            data = self._buffer + data
        if b"\r" in data:
            self._trailing_cr = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.max_line:
            raise DecodeError(f"upstream line longer than {self.max_line} bytes")
        return lines

    def flush(self) -> list[bytes]:
        rest, self._buffer = self._buffer, b""
        return [rest] if rest else []


class SseEvent:
    """One dispatched SSE event: `event` name (default "message"), `data`, `id`."""

    __slots__ = ("event", "data", "id")

    def __init__(self, event: str, data: str, id: str | None) -> None:
        self.event = event
        self.data = data
        self.id = id

    def __repr__(self) -> str:
        return f"SseEvent(event={self.event!r}, data={self.data!r}, id={self.id!r})"


class SseDecoder:
    """The field rules of the WHATWG event-stream format, fed with network chunks.

    Comments (`:` lines, used as heartbeats by some servers) and unknown fields are
    skipped; `data:` lines accumulate until a blank line dispatches the event.
    """

    __slots__ = ("_lines", "_event", "_data", "_id", "_first")

    def __init__(self, max_line: int = 8 * 1024 * 1024) -> None:
        self._lines = LineDecoder(max_line)
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._first = True

    def decode(self, data: bytes) -> list[SseEvent]:
        return self._events(self._lines.decode(data))

    def flush(self) -> list[SseEvent]:
        # A stream cut before its blank line never dispatches its last event (spec).
        events = self._events(self._lines.flush())
        self._event, self._data = "", []
        return events

    def _events(self, lines: list[bytes]) -> list[SseEvent]:
        events = []
        for raw in lines:
            if self._first:
                self._first = False
                if raw[:3] == b"\xef\xbb\xbf":  # a UTF-8 BOM may open the stream
                    raw = raw[3:]
            if not raw:
                if self._data:
                    events.append(SseEvent(self._event or "message", "\n".join(self._data), self._id))
                self._event, self._data = "", []
                continue
            if raw[:1] == b":":
                continue
            line = raw.decode("utf-8", "replace")
            field, sep, value = line.partition(":")
            if sep and value[:1] == " ":
                value = value[1:]
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
            elif field == "id":
                if "\0" not in value:
                    self._id = value
            # `retry` and unknown fields do not concern a server-side reader.
        return events

