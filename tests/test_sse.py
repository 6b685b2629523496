"""SSE framing, the stream log and the WSGI body."""

import json
import threading
import time

import pytest

from app.sse import (
    DONE,
    HEARTBEAT,
    RETRY,
    ServerSentEvent,
    SseBody,
    StreamLog,
    encode_comment,
    encode_event,
    encode_json,
    read_events,
)


def test_event_has_id_name_and_one_data_line():
    frame = encode_event(7, "token", {"text": "a\nb\r\ndata: x"})
    assert frame == b'id: 7\nevent: token\ndata: {"text":"a\\nb\\r\\ndata: x"}\n\n'
    assert frame.count(b"\n") == 4


def test_an_event_writes_every_field_and_reads_back():
    frame = ServerSentEvent(b"one\r\ntwo\rthree\nfour", "e", 3, retry=100, comment="c1\nc2").encode()
    assert frame == b": c1\n: c2\nid: 3\nevent: e\ndata: one\ndata: two\ndata: three\ndata: four\nretry: 100\n\n"
    assert (DONE, HEARTBEAT, RETRY) == (b"data: [DONE]\n\n", b": ping\n\n", b"retry: 3000\n\n")
    events = read_events([frame, encode_event(4, "token", {"text": "x"}) + DONE])
    assert [(e.event, e.data, e.id) for e in events] == [
        ("e", "one\ntwo\nthree\nfour", "3"), ("token", '{"text":"x"}', "4"), ("message", "[DONE]", "4")]


def test_utf8_is_sent_raw_and_lone_surrogates_are_escaped():
    assert encode_json({"text": "😀é"}) == '{"text":"😀é"}'.encode()
    half = "\ud83d"  # half of an emoji, as a token boundary can leave it
    assert json.loads(encode_json({"text": half})) == {"text": half}


def test_json_is_what_the_standard_encoder_writes():
    values = [{"text": "a\nb\u2028\"\\"}, [1, -2.5, 1e300, None, True, False], {"nested": {"list": [{}]}}, "x", 3,
              {"n": float("nan")}, {1: "int key"}]
    for value in values:
        assert encode_json(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    with pytest.raises(TypeError):
        encode_json({"not": object()})


def test_comment_splits_lines():
    assert encode_comment("a\nb") == b": a\n: b\n\n"


def test_log_wait_returns_frames_after_position_and_times_out():
    log = StreamLog()
    log.append(b"1")
    log.append(b"2")
    assert log.wait(0, 0.01) == [b"1", b"2"]
    assert log.wait(2, 0.01) == []
    threading.Timer(0.05, log.append, args=(b"3",)).start()
    assert log.wait(2, 5) == [b"3"]


def test_body_sends_retry_heartbeat_and_ends_when_log_closes():
    log = StreamLog()
    closed = []
    body = SseBody(log, heartbeat=0.05, on_close=closed.append)
    assert next(body).startswith(b"retry: ")
    assert next(body) == HEARTBEAT  # nothing for 50 ms
    log.append(b"A")
    log.append(b"B")
    assert next(body) == b"AB"  # batched for the reader that fell behind
    threading.Timer(0.02, log.close).start()
    assert list(body) == []
    body.close()
    assert closed == [True]


def test_body_close_before_end_reports_incomplete():
    log = StreamLog()
    closed = []
    body = SseBody(log, heartbeat=1, on_close=closed.append)
    next(body)
    body.close()
    body.close()
    assert closed == [False]


def test_frames_appended_right_before_close_are_not_lost():
    for _ in range(200):
        log = StreamLog()
        body = SseBody(log, heartbeat=0.001)
        next(body)

        def produce(log=log):
            time.sleep(0.0005)
            log.append(b"X")
            log.close()

        threading.Thread(target=produce).start()
        assert b"".join(f for f in body if f != HEARTBEAT) == b"X"
