"""OpenAI's Responses API as a drop-in route: `POST /v1/responses`, `GET` and `DELETE
/v1/responses/{id}`, `POST /v1/responses/{id}/cancel`.

Code written for `client.responses.create(...)` (the openai SDKs, the AI SDK's
`@ai-sdk/openai`) uses the relay by changing its base URL and key, whatever provider the
model names (resolved as on `/v1/chat/completions`). The request goes through the same
front door (`ChatService`): identity, limits, records, the upstream closed when a reader
of a direct stream leaves, failover.

A response is stored as a conversation of its own: a record of the request (`role:
"response"`, the Response object as asked), the history it continues
(`previous_response_id`) and its input, then the assistant's record. Its id is
`resp_<conversation id>`, issued by the server; only its creator finds it. A `background`
response is produced whoever reads it, its events logged in the store, so `GET
…?stream=true&starting_after=N` resumes it on any worker or host from the log, with the
sequence numbers the producer wrote. Details: docs/openai-api.md.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from app import images
from app.chat_request import ID_PATTERN, ChatRequest, check_image_urls, invalid, number_option
from app.config import Settings
from app.errors import ApiError
from app.openai_api import MAX_TOOLS, REASONING_EFFORTS, TOOL_NAME, resolve_model
from app.protocols import (
    Ending,
    ResponseEvents,
    function_call_item,
    message_item,
    reasoning_item,
    response_ending,
    response_item_id,
    response_usage,
)
from app.providers.domain import Task
from app.relay import Answer
from app.routes import chat_service, json_body
from app.service import ChatService
from app.sse import FrameLog
from app.store.base import to_json
from app.tools import neutral_call

bp = Blueprint("responses", __name__)

# Accepted so SDK defaults and common client code work unchanged; they shape nothing the
# relay forwards (sampling details, caching hints, OpenAI's own bookkeeping).
IGNORED = {"user", "metadata", "parallel_tool_calls", "top_p", "truncation", "include", "safety_identifier",
           "prompt_cache_key", "prompt_cache_retention", "service_tier", "stream_options", "top_logprobs",
           "max_tool_calls", "text"}
KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "max_output_tokens", "temperature", "reasoning",
         "previous_response_id", "store", "stream", "background"} | IGNORED
RETRIEVE_QUERY = {"stream", "starting_after", "include", "include[]", "include_obfuscation"}
SUMMARIES = (None, "auto", "concise", "detailed")
NOT_FOUND = "no such response"
MAX_USER_CHARS = 512


# ------------------------------------------------------------------ input items


def _content(content: Any, where: str, max_image_bytes: int = 0) -> Any:
    """A message's content: text, or (a user's, with an image) a list of neutral parts; an
    `input_image` is checked by app/images.py (`max_image_bytes` 0: a role that takes none)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and max_image_bytes:
            parts.append(images.url_part(part.get("image_url"), f"{where}.content[{j}]", max_image_bytes))
        else:
            shown = kind if isinstance(kind, str) else type(part).__name__
            raise invalid(f"{where}.content[{j}]: parts of type {shown[:40]!r} are not supported here")
    return images.neutral_content(parts)


def neutral_input(value: Any, settings: Settings, names: dict[str, str],
                  reference: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` (text, or items: messages, function_call, function_call_output, references to
    output items of stored responses) as the relay's provider-neutral messages. `names` maps
    earlier call ids to their tool's name; `reference` gives the item an `item_reference` names."""
    if isinstance(value, str):
        if not value.strip():
            raise invalid("'input' must not be empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("'input' must be a string or a non-empty list of input items")
    if len(value) > settings.MAX_MESSAGES:  # before parsing them (the budget counts again after)
        raise ApiError(413, "prompt_too_large", f"'input' has more than {settings.MAX_MESSAGES} items")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "item_reference":  # what the AI SDK sends for its earlier assistant messages (store on)
            item = reference(item.get("id"))
            kind = item["type"]
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"{where}.role must be user, assistant, system or developer")
            content = _content(item.get("content"), where, settings.MAX_IMAGE_BYTES if role == "user" else 0)
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and call_id and isinstance(name, str) and isinstance(arguments, str)):
                raise invalid(f"{where}: a function_call needs call_id, name and arguments (strings)")
            names[call_id] = name
            # The calls of one model turn belong to the assistant message they follow.
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append({"id": call_id, "name": name,
                                                              "arguments": arguments or "{}"})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}.call_id must be the call_id of an earlier function_call")
            messages.append({"role": "tool", "tool_call_id": call_id, "name": names.get(call_id, ""),
                             "content": _content(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # another model's reasoning state: no provider here can take it back
        else:
            raise invalid(f"{where}: items of type {str(kind)[:40]!r} are not supported")
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise invalid("'input' must end with a user message or a function_call_output")
    return messages  # sizes: app/budget.py, on the whole request


def function_tools(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Function tools (Responses' flat form): as the relay's tools, and as the response echoes them."""
    if value is None:
        return [], []
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"'tools' must be a list of at most {MAX_TOOLS} function tools")
    tools, echoed = [], []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"tools[{i}]: only function tools ({{type: function, name, parameters}}) are supported")
        name, parameters = tool.get("name"), tool.get("parameters")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"tools[{i}].name must be 1 to 64 letters, digits, '_' or '-'")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].parameters must be a JSON schema object")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"tools[{i}].description must be a string")
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"tools[{i}].strict must be a boolean")
        tools.append({"name": name, "description": description or "",
                      "parameters": parameters or {"type": "object", "properties": {}}})
        echoed.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                       "strict": strict})
    return tools, echoed


def tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | None:
    if value is None:
        return None
    if value in ("auto", "none", "required"):
        return str(value)
    name = value.get("name") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(name, str) or name not in {t["name"] for t in tools}:
        raise invalid("'tool_choice' must be auto, none, required or {type: function, name} naming one of the "
                      "tools")
    return name


def reasoning_option(value: Any) -> tuple[str | None, bool]:
    """`reasoning` as the relay's effort, and whether a summary was asked for."""
    if value is None:
        return None, False
    if not isinstance(value, dict) or set(value) - {"effort", "summary", "generate_summary"}:
        raise invalid("'reasoning' must be an object with 'effort' and 'summary'")
    effort = value.get("effort")
    summary = value.get("summary", value.get("generate_summary"))
    if effort is not None and (not isinstance(effort, str) or effort not in REASONING_EFFORTS):
        raise invalid(f"'reasoning.effort' must be one of {', '.join(REASONING_EFFORTS)}")
    if summary is not None and (not isinstance(summary, str) or summary not in SUMMARIES):
        raise invalid("'reasoning.summary' must be auto, concise or detailed")
    return REASONING_EFFORTS.get(effort) if effort else None, summary is not None


def _flag(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean")
    return value


def _user(value: Any) -> str | None:
    """`user`, echoed in the stored Response object and in every event that carries it: as
    short as a `metadata` value (no budget counts it otherwise)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_USER_CHARS:
        raise invalid(f"'user' must be a string of at most {MAX_USER_CHARS} characters")
    return value


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()):
        raise invalid("'metadata' must be at most 16 string keys (64 characters) with string values (512)")
    return value


# ------------------------------------------------------------------ stored responses


def conversation_of(response_id: Any) -> str:
    """The conversation that holds a response (the same 404 for any id that is not one)."""
    if not isinstance(response_id, str) or not response_id.startswith("resp_") \
            or not ID_PATTERN.fullmatch(response_id[5:]):
        raise ApiError(404, "not_found", NOT_FOUND)
    return response_id[5:]


def stored(service: ChatService, response_id: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A stored response of the caller: its request record and the records of its conversation.
    Another caller's response, one created with `store: false` (nothing of it was kept), or an
    expired one: 404."""
    try:
        records = service.conversation(g.caller, conversation_of(response_id))
    except ApiError as err:
        if err.status == 404:
            raise ApiError(404, "not_found", NOT_FOUND) from None
        raise
    head = records[0] if records else {}
    if head.get("role") != "response":  # a conversation of another route
        raise ApiError(404, "not_found", NOT_FOUND)
    return head, records


def referenced_item(service: ChatService, item_id: Any,
                    read: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """An output item of one of the caller's stored responses, by its id (`msg_`, `fc_` or `rs_`,
    then the response's conversation id and the item's index: see `response_item_id`). `read`
    keeps the output items of each response already read for this request: a request may
    name one response's items hundreds of times, and its conversation may weigh megabytes."""
    kind, _, rest = item_id.partition("_") if isinstance(item_id, str) else ("", "", "")
    conversation_id = rest.rpartition("_")[0]
    found = None
    if kind in ("msg", "fc", "rs") and ID_PATTERN.fullmatch(conversation_id):
        read = {} if read is None else read
        if conversation_id not in read:
            try:
                head, records = stored(service, f"resp_{conversation_id}")
            except ApiError:
                head, records = {}, []
            record = recorded(head, records) if head else None
            read[conversation_id] = output_items(f"resp_{conversation_id}", record,
                                                 head.get("summaries", False)) if record else []
        found = next((item for item in read[conversation_id] if item["id"] == item_id), None)
    if found is None:
        raise invalid(f"item_reference: no item '{str(item_id)[:100]}' among your stored responses")
    return found


def output_items(response_id: str, record: dict[str, Any], summaries: bool) -> list[dict[str, Any]]:
    """An answer's record as output items, in the order the stream writes them."""
    items: list[dict[str, Any]] = []
    status = "completed" if record.get("status") == "done" and record.get("finish_reason") not in (
        "length", "content_filter") else "incomplete"
    if summaries and record.get("reasoning"):
        items.append(reasoning_item(response_item_id("rs", response_id, 0), record["reasoning"], status))
    if record.get("content"):
        items.append(message_item(response_item_id("msg", response_id, len(items)), record["content"], status))
    for call in record.get("tool_calls") or ():
        items.append(function_call_item(response_item_id("fc", response_id, len(items)), call["id"], call["name"],
                                        call["arguments"]))
    return items


def response_object(head: dict[str, Any], response_id: str, record: dict[str, Any] | None,
                    running: bool) -> dict[str, Any]:
    """The Response object: as asked, with the status and output of its answer's record."""
    response = {**head["response"], "id": response_id}
    if record is None:  # no answer recorded yet
        if running or not response.get("background"):
            return {**response, "status": "in_progress"}
        record = {"status": "error", "error": {"message": "the answer was lost (its server stopped)"}}
    outcome = record.get("status")
    ending = Ending("stopped" if outcome in ("stopped", "abandoned") else record.get("finish_reason") or "stop",
                    record.get("usage"), record.get("error") if outcome == "error" else None)
    state = response_ending(ending)
    if state["status"] == "completed":
        state["completed_at"] = int(record.get("created") or time.time())
    return {**response, **state, "output": output_items(response_id, record, head.get("summaries", False)),
            "usage": response_usage(record.get("usage"))}


def recorded(head: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The assistant's record of this response's answer, once it ended."""
    return next((r for r in records if r.get("role") == "assistant" and r.get("request_id") == head["request_id"]),
                None)


def answer_record(answer: Answer) -> dict[str, Any]:
    """An answer in the shape of its stored record (what `Conversations.finish` keeps)."""
    return {"status": answer.outcome, "content": answer.text, "reasoning": answer.reasoning_text,
            "finish_reason": answer.finish_reason, "usage": answer.usage, "created": time.time(),
            "tool_calls": [neutral_call(c) for c in answer.tool_calls]}


# ------------------------------------------------------------------ requests


def parse_response_request(data: dict[str, Any], service: ChatService) -> tuple[ChatRequest, dict[str, Any]]:
    """A Responses request as the relay's request, and the record of it (the Response object as
    asked, and how to answer: stream, background, store, summaries)."""
    settings = service.settings
    unknown = set(data) - KNOWN
    if unknown:
        raise invalid(f"unsupported parameter(s): {', '.join(sorted(unknown))[:200]}")
    text = data.get("text")
    if text is not None and (not isinstance(text, dict) or text.get("format") not in (None, {"type": "text"})):
        raise invalid("only text output ({format: {type: text}}) is supported")
    provider, model = resolve_model(data.get("model"), service.providers, settings)
    store, stream, background = _flag(data, "store", True), _flag(data, "stream", False), _flag(data, "background",
                                                                                                  False)
    if background and not store:
        raise invalid("a background response must be stored: 'background' needs 'store' true")
    instructions = data.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string")
    tools, echoed_tools = function_tools(data.get("tools"))
    choice = tool_choice(data.get("tool_choice"), tools)
    temperature = data.get("temperature")
    if temperature is not None:
        temperature = float(number_option(temperature, "temperature", 0, 2, False, False))
    limit = data.get("max_output_tokens")
    if limit is not None:
        limit = int(number_option(limit, "max_output_tokens", 1, settings.MAX_OUTPUT_TOKENS, True, False))
    effort, summaries = reasoning_option(data.get("reasoning"))
    history: list[dict[str, Any]] = []
    previous = data.get("previous_response_id")
    if previous is not None:
        earlier, records = stored(service, previous)
        if recorded(earlier, records) is None:
            raise invalid("the previous response has not ended yet")
        history = service.conversations.replayable(records)
    names = {c["id"]: c["name"] for m in history for c in m.get("tool_calls", ())}
    read: dict[str, list[dict[str, Any]]] = {}
    messages = neutral_input(data.get("input"), settings, names,
                             lambda item_id: referenced_item(service, item_id, read))
    # Within the history budget, less what the input takes: what is sent stays within the
    # request budget (app/budget.py counts it all).
    history = service.conversations.bounded(history, reserve=sum(len(images.text_of(m["content"])) for m in messages),
                                          reserved=len(messages), images_reserved=list(images.images_in(messages)))
    check_image_urls(history + messages, provider)
    top_p = data.get("top_p")
    response = {
        "id": "", "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": background, "error": None, "incomplete_details": None, "instructions": instructions,
        "max_output_tokens": limit, "metadata": _metadata(data.get("metadata")), "model": data["model"],
        "output": [], "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
        "previous_response_id": previous, "reasoning": data.get("reasoning") or {"effort": None, "summary": None},
        "store": store, "temperature": temperature, "text": {"format": {"type": "text"}},
        "tool_choice": data.get("tool_choice") or "auto", "tools": echoed_tools,
        "top_p": top_p if isinstance(top_p, int | float) and not isinstance(top_p, bool) else None,
        "truncation": "disabled", "usage": None,
        "user": _user(data.get("user")),
    }
    task = Task(messages=history + messages, model=model, system=instructions, temperature=temperature,
                max_tokens=limit, tools=tools, tool_choice=choice, reasoning=effort)
    # The record of the request first (what GET answers with), then what a later response
    # continuing this one replays. `store: false`: no record at all.
    head = {"role": "response", "response": response, "summaries": summaries}
    chat = ChatRequest(provider, task, None, [], records=[head] + history + messages, keep_record=store)
    return chat, {"stream": stream, "background": background, "head": head}


class EventsAfter:
    """A response's log read from the event after sequence number `after` on.

    A log frame may hold several events (see `ResponseEvents`), so the frames before the
    first later event are skipped here, and that frame is cut, keeping log positions
    (which SSE responses count) apart from sequence numbers.
    """

    NUMBER = re.compile(rb'"sequence_number":([0-9]+)')

    def __init__(self, log: FrameLog, after: int) -> None:
        self.log = log
        self.after = after
        self.skipped = 0  # log frames consumed here, before the reader's position 0
        self.skipping = True

    @property
    def frames(self) -> list[bytes]:
        return self.log.frames[self.skipped:]

    @property
    def closed(self) -> bool:
        return self.log.closed

    @property
    def detached(self) -> bool:
        return getattr(self.log, "detached", False)

    def _later(self, frame: bytes) -> bytes:
        """The events of `frame` numbered after `after` (those without a number are kept)."""
        events = frame.split(b"\n\n")
        kept = [e for e in events if e and ((n := self.NUMBER.search(e)) is None or int(n[1]) > self.after)]
        return b"".join(e + b"\n\n" for e in kept)

    def wait(self, position: int, timeout: float) -> list[bytes]:
        while True:
            frames = self.log.wait(position + self.skipped, timeout)
            if not self.skipping or not frames:
                return frames
            for i, frame in enumerate(frames):
                later = self._later(frame)
                if later:
                    self.skipping = False
                    self.skipped += i
                    return [later, *frames[i + 1:]]
            self.skipped += len(frames)


# ------------------------------------------------------------------ routes


@bp.post("/v1/responses")
def create_response() -> Response:
    service = chat_service()
    data = json_body()
    service.admit(g.caller)
    chat, how = parse_response_request(data, service)
    head = how["head"]
    wire = ResponseEvents(head["response"], head["summaries"])
    if how["background"]:
        # Its log repeats the Response object (response.created, .in_progress, the end).
        conversation_id, reading = service.start_background(
            g.caller, chat, wire, log_bytes=3 * len(to_json(head["response"]).encode()))
        if how["stream"]:
            return service.sse(reading, retry=False)
        return jsonify({**head["response"], "id": f"resp_{conversation_id}", "status": "queued"})
    if how["stream"]:
        return service.sse(service.stream(g.caller, chat, wire=wire, transport="responses"), retry=False)
    # A provider's failure is an error status, as on /v1/chat/completions (app/errors.py).
    request_id, conversation_id, answer = service.answer(g.caller, chat, transport="responses")
    return jsonify(response_object(head, f"resp_{conversation_id or request_id}", answer_record(answer),
                                   running=False))


@bp.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str) -> Response:
    service = chat_service()
    unknown = set(request.args) - RETRIEVE_QUERY
    if unknown:
        raise invalid(f"unsupported query parameter(s): {', '.join(sorted(unknown))[:200]}")
    head, records = stored(service, response_id)
    stream = request.args.get("stream", "false")
    if stream not in ("true", "false"):
        raise invalid("'stream' must be true or false")
    if stream == "false":
        return jsonify(response_object(head, response_id, recorded(head, records),
                                       service.background_running(head["request_id"])))
    if not head["response"].get("background"):
        raise invalid("only a background response can be streamed again")
    after = request.args.get("starting_after")
    if after is not None and not re.fullmatch(r"[0-9]{1,12}", after):
        raise invalid("'starting_after' must be a sequence number (a whole number)")
    reading = service.background_reading(g.caller.id, head["request_id"])
    if after is not None:
        reading.log = EventsAfter(reading.log, int(after))
    return service.sse(reading, retry=False)


@bp.post("/v1/responses/<response_id>/cancel")
def cancel_response(response_id: str) -> Response:
    service = chat_service()
    head, records = stored(service, response_id)
    if not head["response"].get("background"):
        raise invalid("only a background response can be cancelled")
    record = recorded(head, records)
    if record is not None:  # ended already: as it is
        return jsonify(response_object(head, response_id, record, running=False))
    service.stop_stream(g.caller, head["request_id"])
    return jsonify({**response_object(head, response_id, None, running=True), "status": "cancelled"})


@bp.delete("/v1/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    service = chat_service()
    head, records = stored(service, response_id)
    if head["response"].get("background") and recorded(head, records) is None:
        service.stop_stream(g.caller, head["request_id"])  # nobody could ever read what it still makes
    service.forget_conversation(g.caller, conversation_of(response_id))
    return jsonify(id=response_id, object="response", deleted=True)
