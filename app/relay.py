"""The relay: provider deltas -> protocol events in a stream log, read by SSE responses.

A `Generation` is one answer being produced. Its producer calls the provider and appends
encoded events to a `StreamLog`; SSE responses read that log at their own pace, and a
stream's fate (stopped, reader gone, done) is decided in one place: the `Cancellation`
the producer watches.

Who runs the producer: usually the first reader's own thread (or greenlet), through
`DrivenLog`. Its `wait` produces until there is a new frame, so a token costs one wake-up
(the upstream read) instead of two (a producer thread, then the reader it wakes): under
mod_wsgi, where each wake-up is an OS thread taking the GIL among hundreds, that was a
quarter of the CPU. The provider yields `Idle` while it waits, so that thread still sends
heartbeats and notices a departed client. When the driving reader leaves before the end
(a POST-SSE reader that will resume, a stopped answer finishing), the rest runs on a thread
of its own, as does every generation whose waits could outlast a heartbeat (server-side
tools, a provider that cannot yield while idle) and an answer adopted from a process that
died (its readers read it through the store).
"""

from __future__ import annotations

import atexit
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from app.config import Settings
from app.logs import REQUEST_ID
from app.protocols import Ending, RelayEvents, WireEncoder
from app.providers import Provider, ProviderError, Task
from app.providers.domain import Cancellation, Delta, Finish, Idle, Meta, Reasoning, Signed, Text, ToolCall, Usage
from app.sse import RETRY_MS, StreamLog, encode_event
from app.store import Store
from app.tools import Tool, answer_deltas

logger = logging.getLogger("llm_sse_relay.stream")


def new_id() -> str:
    """An unguessable id (128 random bits), URL-safe."""
    return secrets.token_urlsafe(16)


@dataclass
class Answer:
    """What a generation produced so far; the same record for streamed and REST answers."""

    parts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)  # visible thinking, never part of the text
    signed: list[dict[str, Any]] = field(default_factory=list)  # {"provider", "item"}, in the order they came
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_records: list[dict[str, Any]] = field(default_factory=list)  # executed server-side tools
    tool_messages: list[dict[str, Any]] = field(default_factory=list)  # their rounds, as neutral messages
    outcome: str = "running"  # done | error | stopped | abandoned
    error: dict[str, Any] | None = None
    failovers: list[dict[str, Any]] = field(default_factory=list)  # where another provider took over
    retries: int = 0  # upstream calls retried before the first token

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    def note(self, delta: Delta) -> None:
        """Keep what a non-text delta says (text is appended by the caller, on its hot path)."""
        if isinstance(delta, Reasoning):
            self.reasoning.append(delta.text)
        elif isinstance(delta, Signed):
            self.signed.append({"provider": delta.provider, "item": delta.item})
        elif isinstance(delta, Usage):
            self.usage = delta.usage
        elif isinstance(delta, Finish):
            self.finish_reason = delta.reason
        elif isinstance(delta, ToolCall):
            self.tool_calls.append(delta)
        elif isinstance(delta, Meta):
            if "failover" in delta.data:
                self.failovers.append(delta.data["failover"])
            elif "retry" in delta.data:
                self.retries += 1


@dataclass
class Adopted:
    """The part of an answer another process produced before it died: the frames in the store
    and the text they carry, which a new producer continues, and the lease it took the stream
    over with (read after taking it: the old producer can add nothing since)."""

    frames: list[bytes]
    text: str
    lease: str = ""


# Why a producer stops when another process adopted its stream (it stalled, it was not dead).
SUPERSEDED = "superseded"


@dataclass
class Resumable:
    """How a POST-SSE generation is shared: its store, and how long it waits for readers."""

    store: Store
    grace: float


# A reader sent away by a draining process comes back (on another worker) after EventSource's
# `retry` interval; twice that before it counts as gone, whatever STREAM_GRACE_SECONDS says.
RESUME_WINDOW_SECONDS = 2 * RETRY_MS / 1000

# What a producer step ended on (see Generation.step): a delta was produced; the provider is
# about to block (what is in the log can go out now); or it was silent for a heartbeat.
PROGRESS, BLOCKING, SILENT = 0, 1, 2


class Generation:
    """One answer in production: its provider call, stream log and readers.

    A direct stream stops as soon as its reader leaves. A resumable one also copies its
    log to the store (for readers in other processes), obeys stop requests made there,
    and outlives its last reader by a grace period.

    `record` keeps the answer (conversation memory) before the last event is sent, so a
    reader is never told `done` about an answer that was not kept; `release` runs after
    the end, however it ended (the caller's stream slot).
    """

    def __init__(self, provider: Provider, task: Task, conversation_id: str, *, stream_id: str | None = None,
                 owner: str = "", resumable: Resumable | None = None, tools: list[Tool] | None = None,
                 max_rounds: int = 4, record: Callable[[Generation], None] | None = None,
                 release: Callable[[Generation], None] | None = None,
                 on_end: Callable[[Generation], None] | None = None, wire: WireEncoder | None = None,
                 request_id: str = "-", resumed: Adopted | None = None, heartbeat: float = 15.0) -> None:
        self.id = stream_id or new_id()
        self.request_id = request_id  # of the request that started it: on its log lines and in msgid
        # What the client reads (app/protocols.py); an adopted answer's events are numbered on
        # from the stored ones.
        self.wire: WireEncoder = wire if wire is not None else RelayEvents(
            1 if resumed is None else len(resumed.frames) + 1)
        self.owner = owner  # the caller the stream is bound to (see app.access)
        self.tools = tools or []
        self.max_rounds = max_rounds
        self.record = record
        self.release = release
        self.on_end = on_end
        self.resumable = resumable
        self.abort_error: dict[str, Any] | None = None
        self._watching = False
        self.provider = provider
        self.task = task
        self.conversation_id = conversation_id
        self.log = StreamLog()
        self.cancel = Cancellation()
        self.answer = Answer()
        self.resumed = resumed
        if resumed is not None:  # another process produced the beginning: continue its log
            self.log.frames.extend(resumed.frames)
            self.answer.parts.append(resumed.text)
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.token_events = 0
        self.readers = 0
        self.heartbeat = heartbeat
        self.finished = False  # the end hooks have run
        self._driver_wanted = False
        self._steps: Iterator[int] = iter(())
        self._lock = threading.Lock()

    # -- lifecycle
    def start(self, flusher: LogFlusher | None = None, driven: bool = False) -> Generation:
        """Start producing. `driven`: the first reader's own thread produces, step by step, as
        it reads (`DrivenLog`): one thread woken per token instead of two, and no hand-off
        between them. Whatever that reader does not finish is finished on a thread of its own.
        """
        if self.resumable is not None and flusher is not None:
            flusher.add(self)
        self._steps = self._produce()
        if driven:
            self._driver_wanted = True
            self.cancel.idle_after = self.heartbeat
        else:
            self._in_background()
        return self

    def _in_background(self) -> None:
        threading.Thread(target=self.run, name=f"relay-{self.id[:8]}", daemon=True).start()

    def claim_driver(self) -> bool:
        """True once, for the reader that is to drive a driven generation."""
        with self._lock:
            wanted, self._driver_wanted = self._driver_wanted, False
            return wanted

    def stop(self, reason: str = "stopped") -> None:
        """End the generation now: the upstream socket is shut, readers get the end."""
        self.cancel.cancel(reason)

    def abort(self, error: dict[str, Any]) -> None:
        """End the generation with an `error` event (e.g. the store went away)."""
        self.abort_error = error
        self.cancel.cancel("error")

    def reader_joined(self) -> None:
        with self._lock:
            self.readers += 1

    def reader_left(self, completed: bool) -> None:
        """A direct stream's only reader left before the end: nobody pays for the rest. A
        resumable one's is waited for, here or in another process, for a grace period."""
        with self._lock:
            self.readers -= 1
            last = self.readers == 0
            if not last or completed or self.log.closed:
                return
            grace = self.resumable.grace if self.resumable is not None else 0.0
            if self.log.detached:
                # This process is draining and sent its readers to resume on another worker:
                # that is not leaving, so even with no grace period they get time to come back.
                grace = max(grace, RESUME_WINDOW_SECONDS)
            if grace > 0:
                if not self._watching:
                    self._watching = True
                    threading.Thread(target=self._watch_absence, args=(grace,), daemon=True).start()
                return
        self.stop("abandoned")

    def driver_left(self, completed: bool) -> None:
        """The driving reader left: the rest of the answer (its end, if it was stopped) is
        produced on a thread of its own."""
        self.reader_left(completed)
        if not self.finished:
            self._in_background()

    def step(self) -> int | None:
        """Produce up to the next delta: PROGRESS, BLOCKING or SILENT, or None once ended."""
        return next(self._steps, None)

    def _watch_absence(self, grace: float) -> None:
        """Stop once nobody, here or in another process, has read for `grace` seconds."""
        assert self.resumable is not None
        while not self.cancel.wait(grace):
            if self.log.closed:
                break
            with self._lock:
                if self.readers:
                    self._watching = False
                    return
            try:
                seen = self.resumable.store.seen_at(self.id, "reader")
            except Exception:
                seen = None
            if seen is None or time.time() - seen >= grace:
                self.stop("abandoned")
                break
        with self._lock:
            self._watching = False

    # -- the producer
    def run(self) -> None:
        """Produce to the end on this thread."""
        for _ in self._steps:
            pass

    def _produce(self) -> Iterator[int]:
        """The producer, one step per delta; yields PROGRESS, BLOCKING (the provider is about to
        block: what is in the log can go out) or SILENT (nothing for a heartbeat)."""
        REQUEST_ID.set(self.request_id)  # this thread's log lines belong to that request
        append = self.log.append
        answer = self.answer
        parts = answer.parts
        wire = self.wire
        text_frame = wire.text
        if self.resumed is None:
            for frame in wire.opening(self.id, self.conversation_id, self.provider.name, self.task.model,
                                      self.request_id):
                append(frame)
        else:
            notice = wire.meta({"resumed": {"after_chars": len(self.resumed.text), "reason": "producer_lost"}})
            if notice is not None:
                append(notice)
        yield BLOCKING  # the opening goes out before the provider is called
        ending: Ending | None = None
        try:
            deltas = answer_deltas(self.provider, self.task, self.cancel, self.tools, self.max_rounds,
                                   answer.tool_records, answer.tool_messages)
            for delta in deltas:
                if type(delta) is Text:  # the hot path: one encode, one append
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    parts.append(delta.text)
                    append(text_frame(delta.text))
                    yield PROGRESS
                    continue
                if type(delta) is Idle:
                    yield SILENT if delta.silent else BLOCKING
                    continue
                said = (wire.reasoning(delta.text) if isinstance(delta, Reasoning)
                        else wire.meta(delta.data) if isinstance(delta, Meta)
                        else wire.tool_call(delta) if isinstance(delta, ToolCall)
                        else wire.signed(delta) if isinstance(delta, Signed)
                        else None)
                if said is not None:
                    append(said)
                answer.note(delta)
                yield PROGRESS
            ending = self._ending()
        except ProviderError as err:
            answer.outcome, answer.error = "error", err.as_event()
            ending = Ending(usage=answer.usage, error=answer.error)
        except Exception:
            logger.exception("stream %s failed", self.id)
        finally:
            if ending is None:  # an exception above, or the thread itself being killed: readers still get an end
                answer.outcome = "error"
                answer.error = {"type": "internal_error", "message": "the relay failed while streaming this answer"}
                ending = Ending(usage=answer.usage, error=answer.error)
            self.token_events = len(parts)
            for frame in wire.closing(self._recorded(ending)):
                append(frame)
            self.log.close()
            self._log_line()
            for hook in (self.release, self.on_end):
                if hook is not None:
                    try:
                        hook(self)
                    except Exception:
                        logger.exception("stream %s: end hook failed", self.id)
            self.finished = True

    def _ending(self) -> Ending:
        """How an answer that was not interrupted by a provider error ended."""
        answer = self.answer
        if self.abort_error is not None:
            answer.outcome, answer.error = "error", self.abort_error
            return Ending(usage=answer.usage, error=self.abort_error)
        if self.cancel.is_set():
            answer.outcome = self.cancel.reason or "stopped"
            answer.finish_reason = "stopped"
            return Ending("stopped", answer.usage)
        answer.outcome = "done"
        return Ending(answer.finish_reason or "stop", answer.usage,
                      report_usage=answer.usage is not None or answer.finish_reason is not None)

    def _recorded(self, ending: Ending) -> Ending:
        """Keep the answer; when that fails the reader is told so instead of `done`."""
        if self.record is None:
            return ending
        try:
            self.record(self)
        except Exception as exc:
            logger.warning("stream %s: the answer could not be recorded: %s", self.id, exc)
            self.answer.outcome = "error"
            self.answer.error = {"type": "store_unavailable",
                                 "message": "the answer could not be saved to the conversation; try again shortly"}
            return replace(ending, error=self.answer.error)
        return ending

    def _log_line(self) -> None:
        """One summary line per stream (structured in JSON logs)."""
        if not logger.isEnabledFor(logging.INFO):  # the bench's LOG_LEVEL=WARNING: nothing to build
            return
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000)
        summary = {"id": self.id, "provider": self.provider.name, "model": self.task.model, "ttft_ms": ttft,
                   "tokens": self.token_events, "duration_ms": round((time.monotonic() - self.started) * 1000),
                   "outcome": self.answer.outcome, "error": (self.answer.error or {}).get("type"),
                   "failovers": len(self.answer.failovers)}
        logger.info(
            "stream id=%s provider=%s model=%s ttft_ms=%s tokens=%d duration_ms=%d outcome=%s%s",
            self.id, self.provider.name, self.task.model, "-" if ttft is None else ttft, self.token_events,
            summary["duration_ms"], self.answer.outcome,
            f" error={summary['error']}" if summary["error"] else "", extra={"stream": summary},
        )


class DrivenLog:
    """A generation's log as its driving reader sees it: `wait` produces, on the reader's
    thread, until there is something past `position` or the upstream was silent for a
    heartbeat (then the reader sends one, or notices its client left)."""

    __slots__ = ("generation", "log")

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.log = generation.log

    @property
    def frames(self) -> list[bytes]:
        return self.log.frames

    @property
    def closed(self) -> bool:
        return self.log.closed

    @property
    def detached(self) -> bool:
        return self.log.detached

    def wait(self, position: int, timeout: float) -> list[bytes]:
        """Produce until the provider would block with something new in the log (all the
        tokens of one upstream read go out in one write), is silent for a heartbeat, or ends."""
        log, step = self.log, self.generation.step
        frames = log.frames
        if len(frames) > position:
            return frames[position:]
        while not log.detached:
            state = step()
            if state is None or state == SILENT or (state == BLOCKING and len(frames) > position):
                break
        return frames[position:]


# How often a producer says it is alive; a reader elsewhere gives up after 5x this silence.
PRODUCER_ALIVE_SECONDS = 1.0


@dataclass
class Flushed:
    """A generation the flusher copies to the store: how many of its frames the store has,
    and the lease they are written under."""

    generation: Generation
    written: int
    lease: str


class LogFlusher:
    """Copies every resumable generation of this process to the store, in batches.

    One thread per process, not one per stream: every FLUSH_SECONDS it writes what all
    streams produced since the last tick in one store round trip (one SQLite transaction,
    one Redis pipeline), looks for stop requests for all of them in one query, and says
    they are alive. The per-token path only appends to memory; local readers never wait
    for the store, and readers elsewhere are at most one tick behind.

    Each stream is written under a lease. A producer that stalled longer than readers wait
    for it (a store stall over 5 s) may find its stream adopted elsewhere: the store then
    refuses its writes, and it stops, its local readers sent to resume from the store.
    """

    # Between batches: the most a reader in another process lags behind a local one.
    FLUSH_SECONDS = 0.05
    # How often a stop requested through the store is looked for ("within a second").
    STOP_CHECK_SECONDS = 0.25

    def __init__(self, store: Store, ttl: float, on_closed: Callable[[Generation], None],
                 on_store_error: Callable[[], None] | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.on_closed = on_closed  # the log is complete in the store: readers anywhere see the end
        self.on_store_error = on_store_error
        self.active: dict[str, Flushed] = {}  # by stream id
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._exit_hook = False

    def flush_now(self) -> None:
        """Write what is not in the store yet, now (at process exit: a reader that resumes
        elsewhere, or an adopter, must find every frame a reader here was sent)."""
        with self._lock:
            entries = list(self.active.items())
        try:
            if entries:
                self._flush(entries)
        except Exception as exc:
            logger.warning("stream store: final flush failed: %s", exc)

    def add(self, generation: Generation) -> None:
        if generation.resumed is not None and generation.resumed.lease:
            lease = generation.resumed.lease  # the adopter took the log over already
        else:
            lease = new_id()
            self.store.open_log(generation.id, self.ttl, generation.owner, lease)
        with self._lock:
            if not self._exit_hook:  # a process that is shut down (mod_wsgi on a restart) flushes first
                atexit.register(self.flush_now)
                self._exit_hook = True
            # An adopted stream's log already holds the frames the store has.
            self.active[generation.id] = Flushed(generation, len(generation.log.frames), lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="relay-log-flusher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        next_stop_check = next_alive = 0.0
        while True:
            time.sleep(self.FLUSH_SECONDS)
            with self._lock:
                entries = list(self.active.items())
                if not entries:
                    self._thread = None
                    return
            try:
                self._flush(entries)
            except Exception as exc:
                # One stream's rows may be what the store refuses: write each alone, so a
                # failure stays with the stream it belongs to.
                logger.warning("stream store batch failed (%s); writing streams one by one", exc)
                for entry in entries:
                    try:
                        self._flush([entry])
                    except Exception as own:
                        self._abort(entry[0], entry[1].generation, own)
            running = [sid for sid, flushed in entries if not flushed.generation.log.closed and sid in self.active]
            now = time.monotonic()
            try:  # control, not data: a failure here is retried on the next tick
                if running and now >= next_stop_check:
                    next_stop_check = now + self.STOP_CHECK_SECONDS
                    for sid in self.store.stopped_among(running):
                        self.active[sid].generation.stop("stopped")
                if running and now >= next_alive:  # readers elsewhere can tell a live producer from a dead one
                    next_alive = now + PRODUCER_ALIVE_SECONDS
                    self.store.touch_many(running, "producer")
            except Exception as exc:
                logger.warning("stream store control check failed: %s", exc)

    def _abort(self, stream_id: str, generation: Generation, exc: Exception) -> None:
        logger.warning("stream %s: its log cannot be stored (%s); stopping it", stream_id, exc)
        if self.on_store_error is not None:
            self.on_store_error()
        generation.abort({"type": "store_unavailable",
                          "message": "the stream could not be saved for resuming; the answer was stopped"})
        with self._lock:
            self.active.pop(stream_id, None)
        self.on_closed(generation)

    def _superseded(self, stream_id: str) -> None:
        """Another process adopted this stream: write nothing more, stop the upstream call, and
        send this process's readers to resume from the store (the adopter's log)."""
        with self._lock:
            entry = self.active.pop(stream_id, None)
        if entry is None:
            return
        generation = entry.generation
        logger.warning("stream %s: adopted by another process while this one stalled; stopping here", stream_id)
        generation.log.detach()  # first: the readers must not take this producer's end for the answer's
        generation.stop(SUPERSEDED)
        self.on_closed(generation)

    def _flush(self, entries: list[tuple[str, Flushed]]) -> None:
        batch: dict[str, list[tuple[int, bytes]]] = {}
        written: dict[str, int] = {}
        finished = []
        leases = {sid: entry.lease for sid, entry in entries}
        for sid, entry in entries:
            done = entry.written
            log = entry.generation.log
            closed = log.closed  # read before the frames: a closed log has all of them
            frames = log.frames
            count = len(frames)
            if count > done:
                batch[sid] = [(done + i + 1, f) for i, f in enumerate(frames[done:count])]
                written[sid] = count
            if closed:
                finished.append(sid)
        fenced = self.store.append_many(batch, closing=tuple(finished), ttl=self.ttl, leases=leases) \
            if batch or finished else set()
        # Only now that the store has them: a failed batch is written again next time.
        for sid, entry in entries:
            if sid in written:
                entry.written = written[sid]
        for sid in fenced:
            self._superseded(sid)
        for sid in finished:
            if sid in fenced:
                continue
            with self._lock:
                ended = self.active.pop(sid, None)
            if ended is not None:
                self.on_closed(ended.generation)


class StoreLogView:
    """A stream log in the store, read like a `StreamLog` (for readers in other processes).

    It is `closed` only when the read that found no new frames also found the log closed,
    in the same snapshot: a state read apart from the frames could be the one after the
    producer's final flush, and the end of the answer would be lost."""

    def __init__(self, store: Store, stream_id: str, adopt: Callable[[], StreamLog | None] | None = None) -> None:
        self.store = store
        self.stream_id = stream_id
        self.frames: list[bytes] = []  # only ever the frames not yet returned
        self.detached = False
        self.adopt = adopt  # continue the answer here when its producer died (see ChatService)
        self._adopted: StreamLog | None = None
        self._touched = 0.0
        self._ended = False  # the log was closed with nothing after what was returned

    @property
    def closed(self) -> bool:
        if self._adopted is not None:
            return self._adopted.closed
        return self._ended

    def wait(self, position: int, timeout: float) -> list[bytes]:
        if self._adopted is not None:
            return self._adopted.wait(position, timeout)
        if self._ended:
            return []
        store, stream_id = self.store, self.stream_id
        try:
            now = time.monotonic()
            if now - self._touched >= 1.0:  # tells the producer's grace watchdog someone reads
                self._touched = now
                store.touch(stream_id, "reader")
            read = store.read_log(stream_id, position, timeout)
            if read.frames:
                return [frame for _, frame in read.frames]
            if read.state is None:
                return self._fail("stream_lost", "this stream's log is gone from the store (expired, or the store "
                                                  "was restarted)")
            if read.state != "open":
                self._ended = True
                return []
            producer = store.seen_at(stream_id, "producer")
            if producer and time.time() - producer > 5 * PRODUCER_ALIVE_SECONDS:
                adopted = self.adopt() if self.adopt is not None else None
                if adopted is not None:  # this process continues the answer: read its log from here on
                    self._adopted = adopted
                    return adopted.wait(position, timeout)
                return self._fail("stream_lost", "the process generating this answer stopped")
            return []
        except Exception as exc:
            logger.warning("stream %s: reading its log from the store failed: %s", stream_id, exc)
            return self._fail("store_unavailable", "the stream store is unavailable; try again shortly")

    def _fail(self, kind: str, message: str) -> list[bytes]:
        self._ended = True
        return [encode_event(None, "error", {"type": kind, "message": message})]


def collect(provider: Provider, task: Task, cancel: Cancellation | None = None, tools: list[Tool] | None = None,
            max_rounds: int = 4, answer: Answer | None = None) -> Answer:
    """Run a generation to the end without a stream log (the REST route, `ask()`).

    Same deltas, same accumulation as the streamed path, so the text is identical.
    Pass `answer` to keep what was produced when a `ProviderError` interrupts it.
    """
    answer = answer if answer is not None else Answer()
    cancel = cancel or Cancellation()
    for delta in answer_deltas(provider, task, cancel, tools, max_rounds, answer.tool_records, answer.tool_messages):
        if delta.__class__ is Text:
            answer.parts.append(delta.text)
        else:
            answer.note(delta)
    if cancel.is_set():  # its client left (or it was stopped): what was produced so far
        answer.outcome = cancel.reason or "stopped"
        answer.finish_reason = "stopped"
        return answer
    answer.outcome = "done"
    answer.finish_reason = answer.finish_reason or "stop"
    return answer


class Relay:
    """The generations of this process: started here, found here by id, flushed to the store."""

    def __init__(self, settings: Settings, store: Store, on_store_error: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.generations: dict[str, Generation] = {}
        self.flusher = LogFlusher(store, settings.STREAM_LOG_TTL, on_closed=self._ended, on_store_error=on_store_error)
        self._lock = threading.Lock()

    def start(self, provider: Provider, task: Task, conversation_id: str, *, stream_id: str, owner: str,
              resumable: bool = False, tools: list[Tool] | None = None,
              record: Callable[[Generation], None] | None = None,
              release: Callable[[Generation], None] | None = None, wire: WireEncoder | None = None,
              request_id: str = "-", resumed: Adopted | None = None, driven: bool = False) -> Generation:
        """Start producing an answer: now on a thread of its own, or (`driven`) on the thread
        of its first reader, which must then read it through `DrivenLog`."""
        share = Resumable(self.store, self.settings.STREAM_GRACE_SECONDS) if resumable else None
        # A resumable generation stays findable here until its log is complete in the store.
        generation = Generation(provider, task, conversation_id, stream_id=stream_id, owner=owner, resumable=share,
                                tools=tools, max_rounds=self.settings.TOOL_MAX_ROUNDS, record=record,
                                release=release, on_end=None if share else self._ended, wire=wire,
                                request_id=request_id, resumed=resumed,
                                heartbeat=self.settings.SSE_HEARTBEAT_SECONDS)
        with self._lock:
            self.generations[generation.id] = generation
        return generation.start(self.flusher, driven=driven)

    def resumable(self, stream_id: str) -> Generation | None:
        """A POST-SSE generation of this process, by id. Direct streams (SSE, fetch, WebSocket,
        /v1, the AI SDK route) are never found by id: their one reader is the client that
        started them, and their id is shown to it (`chatcmpl-<id>`, `msg-<id>`) without being a
        credential; when that client leaves, nobody else may keep them running."""
        generation = self.generations.get(stream_id)
        return generation if generation is not None and generation.resumable is not None else None

    def detach_readers(self) -> int:
        """This process is stopping: readers of resumable answers resume on other workers from
        the store, while the producers here run to their end. Returns how many were moved."""
        with self._lock:
            movable = [g for g in self.generations.values() if g.resumable is not None and not g.log.closed]
        for generation in movable:
            generation.log.detach()
        return len(movable)

    def _ended(self, generation: Generation) -> None:
        with self._lock:
            self.generations.pop(generation.id, None)
