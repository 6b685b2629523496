"""A fake LLM provider on 127.0.0.1 that speaks the real wire formats over a real socket.

Tests queue `Reply`s; each accepted request takes the next one (the last one repeats).
Bodies are built by `openai_body`, `anthropic_body`, `gemini_body`, … from a list of
text pieces, then cut into network chunks by `hostile_chunks` so lines, CRLF pairs and
multi-byte UTF-8 characters straddle chunk boundaries. Every request, and the moment
the relay closed each connection, is recorded.

Like the real APIs, it refuses (400, before any queued reply is taken) what they refuse
about reasoning: see `refusal`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    delay: float = 0.0  # between chunks
    stall_after: int | None = None  # send this many chunks, then go silent until the client leaves
    pauses: dict[int, float] = field(default_factory=dict)  # extra silence before chunk i
    chunked: bool = True  # False: close-delimited body, as HTTP/1.0-style servers send
    content_type: str = "text/event-stream"
    keep_alive: bool = False  # keep the connection for the next request
    head_delay: float = 0.0  # silence before the status line (a model still loading)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    opened_at: float
    closed_at: float | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    sent: list[float] = field(default_factory=list)  # when each chunk left
    connection: int = 0  # which TCP connection carried it


class FakeUpstream:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(256)
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.replies: list[Reply] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    # -- test API
    def reset(self, *replies: Reply) -> None:
        with self._lock:
            self.replies = list(replies)
            self.seen = []

    def last(self) -> Seen:
        return self.seen[-1]

    def wait_for_request(self, count: int = 1, timeout: float = 5.0) -> Seen:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream saw {len(self.seen)} requests, expected {count}")
            time.sleep(0.01)
        return self.seen[count - 1]

    def close(self) -> None:
        self._stopped = True
        self._sock.close()

    # -- the server
    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _next_reply(self) -> Reply:
        with self._lock:
            if not self.replies:
                return Reply(status=500, chunks=[b'{"error":{"message":"no reply queued"}}'])
            return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def _handle(self, conn: socket.socket) -> None:
        if self._tls is not None:
            try:
                conn = self._tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
        with conn:
            data = b""
            while True:
                data, keep = self._one_request(conn, data)
                if not keep:
                    return

    def _one_request(self, conn: socket.socket, data: bytes) -> tuple[bytes, bool]:
        if True:
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return b"", False
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                body += conn.recv(65536)
            body, rest = body[:length], body[length:]
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = body
            seen = Seen(lines[0].split(" ")[1], headers, parsed, time.monotonic(), connection=conn.fileno())
            with self._lock:
                self.seen.append(seen)
            refused = refusal(seen.path, parsed)
            reply = self._next_reply() if refused is None else refused
            try:
                self._send(conn, reply, seen)
            except OSError:
                return b"", False
            finally:
                seen.closed_at = time.monotonic()
                seen.closed.set()
            return rest, reply.keep_alive and reply.stall_after is None

    def _send(self, conn: socket.socket, reply: Reply, seen: Seen) -> None:
        head = [f"HTTP/1.1 {reply.status} X", f"Content-Type: {reply.content_type}"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        # One request per connection unless asked: the relay's pool must not reuse it for a retry.
        if not reply.keep_alive:
            head.append("Connection: close")
        if reply.chunked:
            head.append("Transfer-Encoding: chunked")
        if reply.head_delay:
            time.sleep(reply.head_delay)
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for i, chunk in enumerate(reply.chunks):
            if reply.stall_after is not None and i >= reply.stall_after:
                break
            if reply.delay and i:
                time.sleep(reply.delay)
            if i in reply.pauses:
                time.sleep(reply.pauses[i])
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if reply.chunked else chunk)
            seen.sent.append(time.monotonic())
        if reply.stall_after is not None:
            conn.settimeout(60)  # silent until the relay hangs up (recv returns b"")
            while conn.recv(1024):
                pass
            return
        if reply.chunked:
            conn.sendall(b"0\r\n\r\n")
        elif not reply.keep_alive:
            conn.shutdown(socket.SHUT_WR)  # a close-delimited body ends here


def self_signed_tls(directory: Any) -> tuple[ssl.SSLContext, str]:
    """A server context for 127.0.0.1 and the path of its certificate (the CA bundle to trust)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = f"{directory}/upstream.crt", f"{directory}/upstream.key"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, cert_path


# ------------------------------------------------------------------ wire formats

TRICKY_TEXT = [
    "Hé", "llo", " 👋", " wörld", " —", " 日本", "語", "\n\n", "data: not", " a field", "\r\n",
    "🚀🚀", " end", ".", " event: x", "\n", "id: 9", " ", "ok",
]


def sse(data: Any, event: str | None = None, eol: str = "\n") -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    out = f"event: {event}{eol}" if event else ""
    return (out + f"data: {payload}{eol}{eol}").encode()


def openai_body(pieces: list[str], finish: str = "stop", usage: bool = True, done: bool = True,
                error_after: int | None = None, groq: bool = False, mistral: bool = False) -> list[bytes]:
    """One frame per list item (so a paced reply sends a token per chunk)."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    frames = [sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}], "usage": None})]
    frames.append(b": keep-alive comment\n\n")
    for i, piece in enumerate(pieces):
        if error_after is not None and i == error_after:
            frames.append(sse({"error": {"message": "The server had an error", "type": "server_error"}}))
            return frames
        content: Any = [{"type": "text", "text": piece}] if mistral and i % 2 else piece
        frames.append(sse({**base, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
                           "usage": None, "obfuscation": "abc"}))
    u = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
    final: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    if groq:
        final["x_groq"] = {"usage": u}
    if mistral:
        final["usage"] = u
    frames.append(sse(final))
    if usage and not (groq or mistral):
        frames.append(sse({**base, "choices": [], "usage": u}))
    frames.append(b"event: unknown_thing\ndata: {\"x\": 1}\n\n")
    if done:
        frames.append(b"data: [DONE]\n\n")
    return frames


def anthropic_body(pieces: list[str], done: bool = True, error_after: int | None = None) -> list[bytes]:
    frames = [
        sse({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                   "content": [], "model": "claude", "stop_reason": None,
                                                   "usage": {"input_tokens": 7, "output_tokens": 1}}},
            "message_start"),
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}     }\n\n',
        sse({"type": "ping"}, "ping"),
    ]
    for i, piece in enumerate(pieces):
        if error_after is not None and i == error_after:
            frames.append(sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                              "error"))
            return frames
        frames.append(sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": piece}}, "content_block_delta"))
    frames.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    frames.append(sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": len(pieces)}}, "message_delta"))
    if done:
        frames.append(sse({"type": "message_stop"}, "message_stop"))
    return frames


def gemini_body(pieces: list[str], done: bool = True, error_after: int | None = None) -> list[bytes]:
    frames = []
    for i, piece in enumerate(pieces):
        if error_after is not None and i == error_after:
            frames.append(sse({"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}},
                              eol="\r\n"))
            return frames
        frames.append(sse({"candidates": [{"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}],
                           "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": i + 1,
                                             "totalTokenCount": i + 4}}, eol="\r\n"))
    if done:
        frames.append(sse({"candidates": [{"content": {"role": "model"}, "finishReason": "STOP", "index": 0}],
                           "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": len(pieces),
                                             "totalTokenCount": len(pieces) + 3}}, eol="\r\n"))
    return frames


BODIES = {
    "openai": openai_body,
    "groq": lambda p, **kw: openai_body(p, groq=True, **kw),
    "mistral": lambda p, **kw: openai_body(p, mistral=True, **kw),
    "openai-compatible": lambda p, **kw: openai_body(p, usage=False, **kw),
    "anthropic": anthropic_body,
    "gemini": gemini_body,
}


def hostile_chunks(frames: list[bytes]) -> list[bytes]:
    """The whole body re-cut into 1..6-byte chunks: every boundary lands somewhere awkward."""
    body = b"".join(frames)
    out, i, step = [], 0, 1
    while i < len(body):
        out.append(body[i:i + step])
        i += step
        step = step % 6 + 1
    return out


def openai_tool_call_body(calls: list[tuple[str, str, str]]) -> list[bytes]:
    """An OpenAI stream that asks for tools: (id, name, arguments JSON), arguments in pieces."""
    base = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "model": "m"}
    frames = []
    for index, (call_id, name, arguments) in enumerate(calls):
        first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        frames.append(sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}]}))
        for i in range(0, len(arguments), 4):
            piece = {"index": index, "function": {"arguments": arguments[i:i + 4]}}
            frames.append(sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]}))
    frames.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def anthropic_tool_use_body(call_id: str, name: str, arguments: str, text: str = "") -> list[bytes]:
    frames = [sse({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}},
                  "message_start")]
    index = 0
    if text:
        frames.append(sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                          "content_block_start"))
        frames.append(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                          "content_block_delta"))
        frames.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        index = 1
    frames.append(sse({"type": "content_block_start", "index": index,
                       "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}},
                      "content_block_start"))
    for i in range(0, len(arguments), 5):
        frames.append(sse({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": arguments[i:i + 5]}},
                          "content_block_delta"))
    frames.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    frames.append(sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
                      "message_delta"))
    frames.append(sse({"type": "message_stop"}, "message_stop"))
    return frames


def gemini_function_call_body(name: str, args: dict[str, Any]) -> list[bytes]:
    """A Gemini stream whose answer is one whole functionCall part (finishReason stays STOP)."""
    return [sse({"candidates": [{"content": {"parts": [{"functionCall": {"name": name, "args": args}}],
                                             "role": "model"}, "finishReason": "STOP", "index": 0}],
                 "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6}},
                eol="\r\n")]


# ------------------------------------------------------------------ OpenAI Responses API
# Events as openai-python's `types/responses` define them (each with `sequence_number`,
# `event:` equal to `type`), and the refusals of a stateless (`store: false`) call.

RESPONSES_USAGE = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                   "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 8}, "total_tokens": 31}


def responses_body(pieces: list[str] = (), *, summary: list[list[str]] | None = None,
                   calls: list[tuple[str, str, str]] = (), end: str | None = "completed",
                   incomplete_reason: str = "max_output_tokens", reasoning_id: str = "rs_1",
                   encrypted: str = "gAAAAB-fake-encrypted-1", error_event: bool = False) -> list[bytes]:
    """A streamed response: a reasoning item when `summary` is given (a list of summary parts,
    each a list of text pieces; the item carries `encrypted`), a message of `pieces`, then one
    function_call item per (call_id, name, arguments JSON), arguments in pieces. `end` is
    "completed", "incomplete" (with `incomplete_reason`), "failed", or None (the stream is cut);
    `error_event` sends an `error` event after the first piece instead."""
    frames: list[bytes] = []
    sequence = iter(range(10**6))
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-5-mini", "status": "in_progress",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
                "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0, "top_p": 1.0,
                "usage": None}

    def event(kind: str, **data: Any) -> None:
        frames.append(sse({"type": kind, "sequence_number": next(sequence), **data}, kind))

    event("response.created", response=response)
    event("response.in_progress", response=response)
    output: list[dict[str, Any]] = []
    if summary is not None:
        index = len(output)
        event("response.output_item.added", output_index=index,
              item={"id": reasoning_id, "type": "reasoning", "summary": [], "status": "in_progress"})
        for part_index, part in enumerate(summary):
            text = "".join(part)
            event("response.reasoning_summary_part.added", item_id=reasoning_id, output_index=index,
                  summary_index=part_index, part={"type": "summary_text", "text": ""})
            for piece in part:
                event("response.reasoning_summary_text.delta", item_id=reasoning_id, output_index=index,
                      summary_index=part_index, delta=piece)
            event("response.reasoning_summary_text.done", item_id=reasoning_id, output_index=index,
                  summary_index=part_index, text=text)
            event("response.reasoning_summary_part.done", item_id=reasoning_id, output_index=index,
                  summary_index=part_index, part={"type": "summary_text", "text": text})
        item = {"id": reasoning_id, "type": "reasoning", "status": "completed", "encrypted_content": encrypted,
                "summary": [{"type": "summary_text", "text": "".join(p)} for p in summary]}
        event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    if pieces:
        index, item_id = len(output), f"msg_{len(output)}"
        event("response.output_item.added", output_index=index,
              item={"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []})
        event("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
              part={"type": "output_text", "text": "", "annotations": []})
        for i, piece in enumerate(pieces):
            event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0, delta=piece,
                  logprobs=[])
            if error_event and i == 0:
                event("error", code="server_error", message="The server had an error processing your request.",
                      param=None)
                return frames
        text = "".join(pieces)
        event("response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text,
              logprobs=[])
        part = {"type": "output_text", "text": text, "annotations": []}
        event("response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part)
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": [part]}
        event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    for call_id, name, arguments in calls:
        index, item_id = len(output), f"fc_{len(output)}"
        event("response.output_item.added", output_index=index,
              item={"id": item_id, "type": "function_call", "status": "in_progress", "call_id": call_id,
                    "name": name, "arguments": ""})
        for i in range(0, len(arguments), 4):
            event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                  delta=arguments[i:i + 4])
        event("response.function_call_arguments.done", item_id=item_id, output_index=index, name=name,
              arguments=arguments)
        item = {"id": item_id, "type": "function_call", "status": "completed", "call_id": call_id, "name": name,
                "arguments": arguments}
        event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    if end == "completed":
        event("response.completed", response={**response, "status": "completed", "output": output,
                                              "usage": RESPONSES_USAGE})
    elif end == "incomplete":
        event("response.incomplete", response={**response, "status": "incomplete", "output": output,
                                               "incomplete_details": {"reason": incomplete_reason},
                                               "usage": RESPONSES_USAGE})
    elif end == "failed":
        event("response.failed", response={**response, "status": "failed", "output": output,
                                           "error": {"code": "server_error",
                                                     "message": "upstream internals: shard 7 on fire"}})
    return frames


def responses_refusal(body: Any, issued: dict[str, dict[str, Any]]) -> str | None:
    """Why OpenAI would refuse this stateless request's input (None: it would not).

    `issued` maps each call_id this fake sent to the reasoning item sent before it: replaying
    that call needs that reasoning item, unchanged, before it in the same model turn (after
    the last user message or tool output); every function_call_output needs its
    function_call earlier in the input.
    """
    if not isinstance(body, dict) or not isinstance(body.get("input"), list):
        return "'input' must be a list of items"
    items = body["input"]
    called: set[str] = set()
    for position, item in enumerate(items):
        kind = item.get("type")
        if kind == "function_call":
            called.add(item.get("call_id"))
            reasoning = issued.get(item.get("call_id"))
            if reasoning is None:
                continue
            turn = []  # the items of the model's turn before this call (back to a user or tool item)
            for earlier in reversed(items[:position]):
                if earlier.get("role") == "user" or earlier.get("type") == "function_call_output":
                    break
                turn.append(earlier)
            sent = next((i for i in turn if i.get("type") == "reasoning" and i.get("id") == reasoning["id"]), None)
            if sent is None:
                return (f"Item '{item.get('call_id')}' of type 'function_call' was provided without its "
                        f"required 'reasoning' item: '{reasoning['id']}'.")
            if sent.get("encrypted_content") != reasoning["encrypted_content"]:
                return f"The encrypted content for item {reasoning['id']} could not be verified."
        elif kind == "function_call_output" and item.get("call_id") not in called:
            return f"No tool call found for function call output with call_id {item.get('call_id')}."
    return None


def issued_reasoning(chunks: list[bytes]) -> dict[str, dict[str, Any]]:
    """From a Responses stream about to be sent: each call_id and the reasoning item before it."""
    issued: dict[str, dict[str, Any]] = {}
    reasoning = None
    for frame in b"".join(chunks).split(b"\n\n"):
        data = next((line[6:] for line in frame.split(b"\n") if line.startswith(b"data: ")), None)
        try:
            event = json.loads(data) if data else None
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("type") != "response.output_item.done":
            continue
        item = event["item"]
        if item.get("type") == "reasoning":
            reasoning = item
        elif item.get("type") == "function_call" and reasoning is not None:
            issued[item["call_id"]] = reasoning
    return issued


class ResponsesUpstream(FakeUpstream):
    """The fake upstream, answering `/responses` as OpenAI does a stateless call: a request
    whose input replays a call it issued without the reasoning item before it (or a tool
    output without its call) gets OpenAI's 400 instead of the queued reply."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(tls)
        self.issued: dict[str, dict[str, Any]] = {}

    def reset(self, *replies: Reply) -> None:
        super().reset(*replies)
        self.issued = {}

    def _send(self, conn: socket.socket, reply: Reply, seen: Seen) -> None:
        if seen.path.endswith("/responses"):
            refusal = responses_refusal(seen.body, self.issued)
            if refusal is not None:
                error = {"error": {"message": refusal, "type": "invalid_request_error", "param": "input",
                                   "code": None}}
                reply = Reply(status=400, chunks=[json.dumps(error).encode()], content_type="application/json")
            elif reply.status == 200:
                self.issued.update(issued_reasoning(reply.chunks))
        super()._send(conn, reply, seen)


# ------------------------------------------------------------------ reasoning and signatures


def thinking_signature(thinking: str) -> str:
    """The signature this fake gives a thinking block: tied to its text, so a block sent back
    changed (or a signature made up) is refused, as Anthropic refuses it."""
    return "EqQBCkYIBRgC" + hashlib.sha256(thinking.encode()).hexdigest()[:24]


def thought_signature(name: str) -> str:
    """The thoughtSignature this fake puts on a Gemini part (opaque base64-like text)."""
    return "CiQB" + hashlib.sha256(name.encode()).hexdigest()[:32] + "=="


def anthropic_thinking_body(thoughts: list[str], pieces: list[str] = (), tool: tuple[str, str, str] | None = None,
                            redacted: str | None = None) -> list[bytes]:
    """An Anthropic stream with thinking on: a thinking block (thinking_delta pieces, then its
    signature_delta), an optional redacted_thinking block, then text and/or one tool_use."""
    frames = [sse({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}},
                  "message_start"),
              sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "thinking", "thinking": "", "signature": ""}}, "content_block_start")]
    for piece in thoughts:
        frames.append(sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "thinking_delta", "thinking": piece}}, "content_block_delta"))
    signature = thinking_signature("".join(thoughts))
    frames.append(sse({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "signature_delta", "signature": signature}}, "content_block_delta"))
    frames.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    index = 1
    if redacted is not None:
        frames.append(sse({"type": "content_block_start", "index": index,
                           "content_block": {"type": "redacted_thinking", "data": redacted}}, "content_block_start"))
        frames.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
        index += 1
    if pieces:
        frames.append(sse({"type": "content_block_start", "index": index,
                           "content_block": {"type": "text", "text": ""}}, "content_block_start"))
        for piece in pieces:
            frames.append(sse({"type": "content_block_delta", "index": index,
                               "delta": {"type": "text_delta", "text": piece}}, "content_block_delta"))
        frames.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
        index += 1
    if tool is not None:
        call_id, name, arguments = tool
        frames.append(sse({"type": "content_block_start", "index": index,
                           "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}},
                          "content_block_start"))
        frames.append(sse({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": arguments}}, "content_block_delta"))
        frames.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    frames.append(sse({"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn"},
                       "usage": {"output_tokens": 40}}, "message_delta"))
    frames.append(sse({"type": "message_stop"}, "message_stop"))
    return frames


def gemini_thinking_body(thoughts: list[str], pieces: list[str] = (),
                         call: tuple[str, dict[str, Any]] | None = None) -> list[bytes]:
    """A Gemini stream with thoughts (`thought: true` parts), then text and/or one functionCall
    part carrying its thoughtSignature (as Gemini 3 sends it); an answer without a call ends
    with an empty part that carries the signature. thoughtsTokenCount in usageMetadata."""
    def chunk(parts: list[dict[str, Any]], finish: bool = False) -> bytes:
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if finish:
            candidate["finishReason"] = "STOP"
        return sse({"candidates": [candidate], "usageMetadata": {
            "promptTokenCount": 4, "candidatesTokenCount": len(pieces) + (call is not None),
            "thoughtsTokenCount": 30, "totalTokenCount": 34 + len(pieces) + (call is not None)}}, eol="\r\n")

    frames = [chunk([{"text": piece, "thought": True}]) for piece in thoughts]
    frames += [chunk([{"text": piece}]) for piece in pieces]
    if call is not None:
        name, args = call
        part = {"functionCall": {"name": name, "args": args}, "thoughtSignature": thought_signature(name)}
        frames.append(chunk([part], finish=True))
    else:
        frames.append(chunk([{"text": "", "thoughtSignature": thought_signature("answer")}], finish=True))
    return frames


def openai_reasoning_body(thoughts: list[str], pieces: list[str], field: str = "reasoning_content") -> list[bytes]:
    """An OpenAI-compatible stream that reasons first: `delta.reasoning_content` (DeepSeek,
    vLLM, llama.cpp) or `delta.reasoning` (Groq, OpenRouter, Ollama), then content; usage
    with completion_tokens_details.reasoning_tokens."""
    base = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    frames = [sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None, field: ""},
                                        "finish_reason": None}]})]
    for piece in thoughts:
        frames.append(sse({**base, "choices": [{"index": 0, "delta": {"content": None, field: piece},
                                                "finish_reason": None}]}))
    for piece in pieces:
        frames.append(sse({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}))
    frames.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    frames.append(sse({**base, "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": len(thoughts) + len(pieces), "total_tokens": 5 + len(thoughts)
        + len(pieces), "completion_tokens_details": {"reasoning_tokens": len(thoughts)}}}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def _error_reply(status: int, body: dict[str, Any]) -> Reply:
    return Reply(status=status, chunks=[json.dumps(body).encode()], content_type="application/json")


def refusal(path: str, body: Any) -> Reply | None:
    """The 400 a real API answers to this request, for the reasoning rules it enforces; else None.

    - Anthropic with thinking on: a budget under 1024 or not below max_tokens; a temperature
      other than 1; a forced tool_choice; and, in a tool round (the last message carries
      tool_result blocks), an assistant turn with tool_use that does not start with its
      thinking block, or whose thinking block is not the one the fake signed.
    - Gemini: thinkingLevel and thinkingBudget together; on a Gemini 3 model, the first
      functionCall part of a model turn in the current turn (after the last user text)
      without its thoughtSignature, or with one the fake did not give.
    """
    if not isinstance(body, dict):
        return None
    if path.endswith("/v1/messages"):
        return _anthropic_refusal(body)
    if ":streamGenerateContent" in path:
        return _gemini_refusal(path, body)
    return None


def _anthropic_refusal(body: dict[str, Any]) -> Reply | None:
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None

    def refuse(message: str) -> Reply:
        return _error_reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": message}})

    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or budget < 1024:
        return refuse("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
    if budget >= body.get("max_tokens", 0):
        return refuse("`max_tokens` must be greater than `thinking.budget_tokens`")
    if "temperature" in body and body["temperature"] != 1:
        return refuse("`temperature` may only be set to 1 when thinking is enabled")
    if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        return refuse("Thinking may not be enabled when tool_choice forces tool use.")
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    in_tool_round = isinstance(last.get("content"), list) and any(
        b.get("type") == "tool_result" for b in last["content"])
    assistants = [m for m in messages if m.get("role") == "assistant"]
    if not in_tool_round or not assistants:
        return None
    content = assistants[-1].get("content")
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
    if any(b.get("type") == "tool_use" for b in blocks):
        first = blocks[0]
        if first.get("type") not in ("thinking", "redacted_thinking"):
            return refuse(f"messages.{messages.index(assistants[-1])}.content.0.type: Expected `thinking` or "
                          f"`redacted_thinking`, but found `{first.get('type')}`. When `thinking` is enabled, a final "
                          "`assistant` message must start with a thinking block (preceeding the lastmost set of "
                          "`tool_use` and `tool_result` blocks).")
        for block in blocks:
            if block.get("type") == "thinking" and block.get("signature") != thinking_signature(
                    block.get("thinking", "")):
                return refuse("Invalid `signature` in `thinking` block")
    return None


def _gemini_refusal(path: str, body: dict[str, Any]) -> Reply | None:
    def refuse(message: str) -> Reply:
        return _error_reply(400, {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})

    config = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    if "thinkingLevel" in config and "thinkingBudget" in config:
        return refuse("You can only set only one of thinking budget and thinking level.")
    model = path.split("/models/", 1)[-1].split(":", 1)[0]
    if not model.startswith("gemini-3"):
        return None
    contents = body.get("contents") or []
    start = max((i for i, c in enumerate(contents) if c.get("role") == "user"
                 and any("text" in p for p in c.get("parts") or ())), default=-1)
    for position, content in enumerate(contents[start + 1:], start + 1):
        # Of parallel calls only the first carries a signature, and only it is checked.
        for part in [p for p in content.get("parts") or () if "functionCall" in p][:1]:
            expected = thought_signature(part["functionCall"].get("name", ""))
            if "thoughtSignature" not in part:
                return refuse(f"Function call is missing a thought_signature in functionCall parts. This is required "
                              f"for tools to work correctly, and missing thought_signature may lead to degraded "
                              f"model performance. Additional data, function call `default_api:"
                              f"{part['functionCall'].get('name')}` , position {position}. Please refer to "
                              f"https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")
            if part["thoughtSignature"] != expected:
                return refuse("Corrupted thought signature.")
    return None
