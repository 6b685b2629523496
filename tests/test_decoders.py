"""Incremental decoding: however the bytes are cut, the events are the same."""

import pytest

from app.decoders import DecodeError, LineDecoder, SseDecoder


def feed(decoder, data: bytes, cuts: list[int]):
    out, start = [], 0
    for cut in [*cuts, len(data)]:
        out += decoder.decode(data[start:cut])
        start = cut
    return out + decoder.flush()


def every_two_way_split(data: bytes):
    for i in range(len(data) + 1):
        yield [i]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_lines_split_on_every_line_ending(eol):
    data = b"a" + eol + b"b" + eol + eol + b"c"
    for cuts in every_two_way_split(data):
        assert feed(LineDecoder(), data, cuts) == [b"a", b"b", b"", b"c"], cuts


def test_crlf_split_between_chunks_is_one_line_end():
    decoder = LineDecoder()
    assert decoder.decode(b"one\r") == [b"one"]
    assert decoder.decode(b"\ntwo\r\n") == [b"two"]


def test_endless_line_is_refused():
    with pytest.raises(DecodeError):
        LineDecoder(max_line=10).decode(b"x" * 11)


STREAM = (
    "\ufeff: comment\r\n"
    "event: content_block_delta\r\n"
    'data: {"text": "héllo 👋"}\r\n'
    "\r\n"
    "data:no-space\n"
    "data:  two spaces\n"
    "unknown: field\n"
    "id: 42\n"
    "retry: 10\n"
    "\n"
    "data: trailing event without blank line"
).encode()


def test_sse_fields_follow_the_spec_for_every_cut():
    expected = None
    for cuts in every_two_way_split(STREAM):
        events = [(e.event, e.data, e.id) for e in feed(SseDecoder(), STREAM, cuts)]
        expected = expected or events
        assert events == expected, cuts
    assert expected == [
        ("content_block_delta", '{"text": "héllo 👋"}', None),
        ("message", "no-space\n two spaces", "42"),
    ]


def test_sse_three_way_cuts_inside_multibyte_characters():
    data = 'data: "日本語🚀"\n\n'.encode()
    for i in range(len(data)):
        for j in range(i, len(data)):
            events = feed(SseDecoder(), data, [i, j])
            assert [e.data for e in events] == ['"日本語🚀"']


def test_chunked_transfer_decoding_for_every_cut():
    from app.decoders import ChunkedDecoder

    body = b"data: one\n\n" + "data: é🚀\n\n".encode() + b"x" * 300
    wire = b"b\r\n" + body[:11] + b"\r\n" + b"%x;ext=1\r\n" % (len(body) - 11) + body[11:] + b"\r\n0\r\nX-T: 1\r\n\r\n"
    for i in range(len(wire) + 1):
        for j in (i, min(len(wire), i + 3)):
            decoder = ChunkedDecoder()
            out = decoder.decode(wire[:i]) + decoder.decode(wire[i:j]) + decoder.decode(wire[j:])
            assert out == body and decoder.done, (i, j)
    with pytest.raises(DecodeError):
        ChunkedDecoder().decode(b"zz\r\n")
