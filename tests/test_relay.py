"""The relay loop in-process: who produces a stream, and what happens when its reader leaves."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

from app.config import Settings
from app.protocols import Ending, OpenAIChunks, RelayEvents, UiMessageStream
from app.providers.domain import IDLE, WAITING, Finish, Provider, Reasoning, Signed, Text, Usage, idle_wait
from app.relay import DrivenLog, Relay, collect
from app.sse import HEARTBEAT, SseBody
from app.store import MemoryStore
from tests.conftest import wait_until

SETTINGS = Settings(STREAM_LOG_TTL=60, STREAM_GRACE_SECONDS=30, TOOL_MAX_ROUNDS=2, SSE_HEARTBEAT_SECONDS=15)


class Counting(Provider):
    """`count` tokens; notes the thread of each and whether the stream was closed early."""

    name = "counting"
    idles = True

    def __init__(self, count: int, pause: float = 0.0, idle_first: int = 0) -> None:
        self.count, self.pause, self.idle_first = count, pause, idle_first
        self.threads: set[int] = set()
        self.produced = 0

    def stream(self, task, cancel):
        for _ in range(self.idle_first):  # as an upstream that is silent for a while
            yield IDLE
        for i in range(self.count):
            if (yield from idle_wait(cancel, self.pause)) or cancel.is_set():
                return
            self.threads.add(threading.get_ident())
            self.produced += 1
            yield Text(f"t{i} ")


def start(provider: Provider, resumable: bool = False):
    relay = Relay(SETTINGS, MemoryStore())
    task = SimpleNamespace(model="m", messages=[])
    return relay.start(provider, task, "conv", stream_id="s" * 22, owner="me", resumable=resumable, driven=True)


def driver(generation) -> SseBody:
    """The first reader, as ChatService makes it."""
    generation.reader_joined()
    assert generation.claim_driver()
    return SseBody(DrivenLog(generation), heartbeat=15, on_close=generation.driver_left)


def test_a_driven_stream_is_produced_on_its_readers_thread_with_heartbeats_when_idle():
    provider = Counting(5, idle_first=3)
    generation = start(provider)
    body = driver(generation)
    assert not generation.claim_driver()  # one driver only
    frames = list(body)
    body.close()
    assert provider.threads == {threading.get_ident()}  # no second thread, no hand-off per token
    assert frames.count(HEARTBEAT) == 3  # each silent tick of the provider is one heartbeat
    text = b"".join(frames)
    assert text.index(b"event: msgid") < text.index(b"t0 ") and b"id: 7\nevent: done" in frames[-1]
    assert generation.finished and generation.answer.text == "t0 t1 t2 t3 t4 "


def test_a_direct_stream_whose_driver_leaves_stops_and_still_ends_properly():
    provider = Counting(1000, pause=0.01)
    generation = start(provider)
    body = driver(generation)
    next(body), next(body), next(body)  # retry, msgid, a token
    body.close()
    wait_until(lambda: generation.finished, 5)
    assert generation.answer.outcome == "abandoned" and provider.produced < 10
    assert generation.log.closed


def test_a_resumable_stream_whose_driver_leaves_is_finished_on_a_thread_of_its_own():
    provider = Counting(30, pause=0.01)
    generation = start(provider, resumable=True)
    first = driver(generation)
    generation.reader_joined()
    other = SseBody(generation.log, heartbeat=15, on_close=generation.reader_left)  # a second tab
    next(first), next(first), next(first)
    first.close()  # the producing reader left: the answer goes on for the other reader
    received = b"".join(other)
    other.close()
    assert b"t29 " in received and b"event: done" in received
    assert threading.get_ident() in provider.threads and len(provider.threads) == 2
    wait_until(lambda: generation.finished, 5)
    assert generation.answer.outcome == "done"


class Bursts(Provider):
    """Two network reads of five tokens each, as a fast upstream delivers them."""

    name = "bursts"
    idles = True

    def stream(self, task, cancel):
        for burst in range(2):
            yield WAITING  # about to read
            for i in range(5):
                yield Text(f"b{burst}.{i} ")


def test_the_tokens_of_one_upstream_read_go_out_in_one_write():
    generation = start(Bursts())
    body = driver(generation)
    writes = [w for w in body if w.count(b"event: token")]
    body.close()
    assert [w.count(b"event: token") for w in writes] == [5, 5]


# ------------------------------------------------------------------ reasoning on every wire


class Thinking(Provider):
    """Thinks, signs what it thought, then answers."""

    name = "thinking"

    def stream(self, task, cancel):
        yield Reasoning("Let me ")
        yield Reasoning("think.")
        yield Signed("thinking", {"type": "thinking", "thinking": "Let me think.", "signature": "sig"})
        yield Text("Four")
        yield Text(".")
        yield Usage(3, 9, reasoning_tokens=5)
        yield Finish("stop")


def produced(wire):
    generation = Relay(SETTINGS, MemoryStore()).start(Thinking(), SimpleNamespace(model="m", messages=[]), "conv",
                                                      stream_id="r" * 22, owner="me", wire=wire)
    wait_until(lambda: generation.log.closed, what="the end of the stream")
    return generation, b"".join(generation.log.frames).decode()


def data_lines(body):
    return [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]


def test_reasoning_is_its_own_relay_event_and_kept_apart_in_the_answer():
    generation, body = produced(RelayEvents())
    events = [line[7:] for line in body.split("\n") if line.startswith("event: ")]
    assert events == ["msgid", "reasoning", "reasoning", "token", "token", "meta", "done"]
    assert [d for d in data_lines(body) if set(d) == {"text"}][:2] == [{"text": "Let me "}, {"text": "think."}]
    assert data_lines(body)[-1]["usage"]["reasoning_tokens"] == 5
    answer = generation.answer
    assert answer.text == "Four." and answer.reasoning_text == "Let me think."
    assert answer.signed == [{"provider": "thinking", "item": {"type": "thinking", "thinking": "Let me think.",
                                                               "signature": "sig"}}]


def test_reasoning_as_openai_reasoning_content_with_reasoning_tokens():
    _, body = produced(OpenAIChunks("m", include_usage=True))
    chunks = data_lines(body)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert [d.get("reasoning_content") for d in deltas if "reasoning_content" in d] == ["Let me ", "think."]
    assert "".join(d.get("content") or "" for d in deltas) == "Four."
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 5}


def test_reasoning_as_ai_sdk_reasoning_parts():
    _, body = produced(UiMessageStream())
    parts = [(p["type"], p.get("id"), p.get("delta")) for p in data_lines(body)]
    assert parts == [("start", None, None), ("start-step", None, None),
                     ("reasoning-start", "reasoning-1", None), ("reasoning-delta", "reasoning-1", "Let me "),
                     ("reasoning-delta", "reasoning-1", "think."), ("reasoning-end", "reasoning-1", None),
                     ("text-start", "text-2", None), ("text-delta", "text-2", "Four"), ("text-delta", "text-2", "."),
                     ("text-end", "text-2", None), ("finish-step", None, None), ("finish", None, None)]


def test_a_reasoning_block_still_open_at_the_end_is_closed():
    wire = UiMessageStream()
    wire.opening("s", "c", "p", "m")
    frames = [wire.reasoning("hmm")] + wire.closing(Ending("stop"))
    types = [p["type"] for p in data_lines(b"".join(frames).decode())]
    assert types == ["reasoning-start", "reasoning-delta", "reasoning-end", "finish-step", "finish"]


def test_rest_collects_the_same_reasoning_and_signed_items():
    answer = collect(Thinking(), SimpleNamespace(model="m", messages=[]))
    assert answer.text == "Four." and answer.reasoning_text == "Let me think." and len(answer.signed) == 1
