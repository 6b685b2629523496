"""The offline `demo` provider: a useful answer at a realistic pace, no key, no network.

It answers from a few built-in notes about streaming (chosen by the words of the
prompt), splits the text into token-sized pieces and paces them like a model does.
Model `demo-fast` sends without pauses (tests, benchmarks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from app.images import describe, images_in, text_of
from app.providers.domain import (
    Cancellation,
    Delta,
    Finish,
    Provider,
    Reasoning,
    Task,
    Text,
    ToolCall,
    Usage,
    idle_wait,
)

NOTES = {
    "apache": (
        "Under **Apache + mod_wsgi** the three things that break streaming are:\n\n"
        "1. `mod_deflate` compressing `text/event-stream` (it waits for a full block), "
        "so the SSE paths get `no-gzip` and `no-brotli`;\n"
        "2. long streams holding every daemon thread, so SSE paths run in their own "
        "`WSGIDaemonProcess`;\n"
        "3. timeouts (`Timeout`, `request-timeout`, mod_reqtimeout) cutting a quiet "
        "stream, so heartbeats keep it busy.\n"
    ),
    "code": (
        "Here is the smallest custom route with this relay's Python API:\n\n"
        "```python\n"
        "from app.python_api import task\n\n"
        "@app.get(\"/haiku\")\n"
        "def haiku():\n"
        "    return task().system(\"You write haiku.\").prompt(\"autumn\").stream()\n"
        "```\n\n"
        "Every token becomes an SSE `token` event the moment it arrives.\n"
    ),
    "sse": (
        "**Server-Sent Events** are plain HTTP: the server keeps the response open and "
        "writes `event:` / `data:` blocks separated by blank lines. The browser's "
        "`EventSource` parses them and reconnects with `Last-Event-ID` if the network "
        "drops, which is why every event here carries an `id:`.\n"
    ),
}
GENERAL = (
    "I am the **demo provider** of llm-sse-relay: I run offline, so you can try the "
    "whole pipeline without a key. Each piece of this answer travels as its own SSE "
    "`token` event, through the same relay, heartbeats and disconnect handling that a "
    "real model's answer uses. 🚀\n\n"
    "A few things worth trying:\n\n"
    "- ask about **Apache**, **SSE** or **code** for other answers;\n"
    "- press *Stop* mid-answer: the generation ends on the server too;\n"
    "- set `OPENAI_API_KEY` (or another provider's key) and pick that provider.\n"
)
PIECE = re.compile(r"\s*[^\s]{1,5}|\s+")
# Arithmetic is found in two linear steps, never by one pattern with nested repeats
# (that kind backtracks for seconds on "1" * 32000): maximal runs of the characters an
# expression is made of, then whether a run has an operator between two numbers.
EXPRESSION_RUN = re.compile(r"[0-9.\s()*/%+-]+")
OPERATION = re.compile(r"[0-9.]\)*(?:\*\*|//|[-+*/%])\(*[-+]?[0-9.(]")
MAX_EXPRESSION_CHARS = 200  # the calculate tool's own limit


def find_expression(prompt: str) -> str | None:
    """The first arithmetic expression in `prompt` ("6 * 7", "(2 + 3) * 4"), in linear time."""
    for run in EXPRESSION_RUN.finditer(prompt):
        text = run.group().strip()
        if len(text) < 3 or len(text) > MAX_EXPRESSION_CHARS:
            continue
        if OPERATION.search("".join(text.split())):
            return text
    return None


def demo_tool_call(prompt: str, tools: list[dict[str, Any]]) -> ToolCall | None:
    """Which tool the demo "model" wants for `prompt`, if any (offline tool calling)."""
    names = {t["name"] for t in tools}
    expression = find_expression(prompt) if "calculate" in names else None
    if expression:
        return ToolCall("demo_call_1", "calculate", json.dumps({"expression": expression}))
    if "current_time" in names and re.search(r"\b(time|date|today|clock)\b", prompt, re.I):
        return ToolCall("demo_call_1", "current_time", json.dumps({"timezone": "UTC"}))
    return named_tool_call(prompt, tools)


def named_tool_call(prompt: str, tools: list[dict[str, Any]]) -> ToolCall | None:
    """Any other tool (a client's, through the OpenAI API) the prompt names, such as "get_weather"
    or "get weather": its required string arguments get the prompt's last word ("… for Paris")."""
    words = re.findall(r"[\w-]+", prompt[:2000].lower())
    if not words:
        return None
    text = " ".join(words)
    for tool in tools:
        name = str(tool.get("name", ""))
        if name and (name.lower() in text or name.lower().replace("_", " ") in text):
            schema = tool.get("parameters") or {}
            properties = schema.get("properties") or {}
            arguments = {key: words[-1] for key in schema.get("required") or ()
                         if (properties.get(key) or {}).get("type", "string") == "string"}
            return ToolCall("demo_call_1", name, json.dumps(arguments))
    return None


def demo_answer(prompt: str, seen: list[str] | None = None) -> str:
    """The demo's answer to `prompt`: what it sees in the attached images (their type and size,
    read from their headers), an echo, then the notes its words ask for."""
    words = prompt.lower()
    chosen = [text for key, text in NOTES.items() if key in words]
    quoted = " ".join(prompt.split())
    if len(quoted) > 120:
        quoted = quoted[:117] + "…"
    head = f"I see {'; '.join(seen)}.\n\n" if seen else ""
    head += f"You asked: “{quoted}”.\n\n" if quoted else ""
    return head + ("\n".join(chosen) if chosen else GENERAL)


def demo_thoughts(prompt: str, level: str, tool: ToolCall | None) -> str:
    """What the demo "thinks" before it answers, when asked for reasoning: longer at higher levels."""
    words = len(prompt.split())
    steps = [f"The question has {words} word{'s' * (words != 1)}."]
    if tool is not None:
        steps.append(f"It needs the `{tool.name}` tool: I will call it first.")
    else:
        steps.append("I know a few notes about streaming; I will pick the ones it asks for.")
    if level in ("medium", "high"):
        steps.append("The answer goes out as `token` events, and these thoughts as `reasoning` events.")
    if level == "high":
        steps.append("Each piece is paced like a model's, so the reader sees it arrive.")
    return " ".join(steps) + "\n"


def split_tokens(text: str) -> list[str]:
    """Token-sized pieces (a leading space and up to five characters), like BPE output."""
    return PIECE.findall(text)


class DemoProvider(Provider):
    name = "demo"
    default_model = "demo"
    models = ("demo", "demo-fast")

    def __init__(self, tokens_per_second: float, first_token_delay: float, default_model: str = "demo") -> None:
        self.interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.first_token_delay = first_token_delay
        self.default_model = default_model

    @property
    def idles(self) -> bool:
        return max(self.interval, self.first_token_delay) <= 1.0  # waits short enough to heartbeat between

    def stream(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        last = task.messages[-1] if task.messages else {}
        asked = next((m for m in reversed(task.messages) if m["role"] == "user"), {})
        prompt = text_of(asked.get("content"))
        call = None
        if last.get("role") == "tool":  # answer with what the tool returned
            text = f"The tool `{last.get('name') or 'you ran'}` says: **{last['content']}**."
        else:
            call = demo_tool_call(str(prompt), task.tools) if task.tools else None
            text = demo_answer(prompt, [describe(image) for image in images_in([asked])])
        paced = task.model != "demo-fast"
        if paced and (yield from idle_wait(cancel, self.first_token_delay)):
            return
        if task.reasoning and last.get("role") != "tool":
            for piece in split_tokens(demo_thoughts(str(prompt), task.reasoning, call)):
                yield Reasoning(piece)
                if paced and self.interval and (yield from idle_wait(cancel, self.interval)):
                    return
        if call is not None:
            yield call
            yield Finish("tool_calls")
            return
        pieces = split_tokens(text)
        limit = task.max_tokens or len(pieces)
        for piece in pieces[:limit]:
            yield Text(piece)
            if paced and self.interval and (yield from idle_wait(cancel, self.interval)):
                return
        input_tokens = sum(len(split_tokens(text_of(m.get("content")))) for m in task.messages)
        yield Usage(input_tokens, min(limit, len(pieces)))
        yield Finish("length" if limit < len(pieces) else "stop")
