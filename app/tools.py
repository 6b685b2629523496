"""Server-side tool calling: application functions the model may call before it answers.

    from app.tools import tool

    @tool
    def get_weather(city: str, unit: str = "C") -> dict:
        "Current weather for a city."
        ...

A request enables tools with `"tools": true` (all) or a list of names. Each round is one
provider call: its text streams as usual; if the model asked for tools, they run here,
are announced as `meta` events (`{"tool": {"name", "arguments", "status",
"result_preview"}}`), and their results go back to the model in its own format for the
next round. A tool that raises, or arguments that are not valid JSON, become a result
that says so: the model is told, the request does not fail.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar, overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.json_depth import MAX_DEPTH, json_nesting
from app.providers.domain import Cancellation, Delta, Finish, Meta, Provider, Reasoning, Signed, Task, Text, ToolCall

F = TypeVar("F", bound=Callable[..., Any])
PREVIEW_CHARS = 200
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any]

    def schema(self) -> dict[str, Any]:
        """The provider-neutral declaration: {name, description, parameters}."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass
class ToolResult:
    """One executed call: what the model asked for and what it gets back."""

    call: ToolCall
    content: str
    ok: bool
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {"name": self.call.name, "arguments": self.call.arguments, "status": "done" if self.ok else "error",
                "result": self.content}


def _json_type(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _json_type(args[0]) if args else {}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(annotation))}
    if origin in (list, tuple):
        return {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    return {"type": JSON_TYPES[annotation]} if annotation in JSON_TYPES else {}


def schema_from_signature(function: Callable[..., Any]) -> dict[str, Any]:
    """JSON schema of a function's parameters, from its type hints and defaults."""
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for name, parameter in inspect.signature(function).parameters.items():
        properties[name] = _json_type(hints.get(name, str))
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
        else:
            properties[name]["default"] = parameter.default
    return {"type": "object", "properties": properties, "required": required}


class Toolbox:
    """The registered tools of an application."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self.tools: dict[str, Tool] = {t.name: t for t in tools}

    def copy(self) -> Toolbox:
        """A toolbox of its own with these tools: what an app takes when it is built."""
        return Toolbox(self.tools.values())

    @overload
    def register(self, function: F, *, name: str | None = None, description: str | None = None,
                 parameters: dict[str, Any] | None = None) -> F: ...

    @overload
    def register(self, function: None = None, *, name: str | None = None, description: str | None = None,
                 parameters: dict[str, Any] | None = None) -> Callable[[F], F]: ...

    def register(self, function: F | None = None, *, name: str | None = None, description: str | None = None,
                 parameters: dict[str, Any] | None = None) -> F | Callable[[F], F]:
        """Decorator: `@toolbox.register` or `@toolbox.register(name=…, parameters=…)`."""

        def add(fn: F) -> F:
            tool_name = name or fn.__name__
            doc = description or inspect.getdoc(fn) or tool_name
            self.tools[tool_name] = Tool(tool_name, doc.strip(), parameters or schema_from_signature(fn), fn)
            return fn

        return add(function) if function is not None else add

    def select(self, wanted: bool | list[str]) -> list[Tool]:
        if wanted is True:
            return list(self.tools.values())
        return [self.tools[n] for n in wanted or () if n in self.tools]

    def run(self, call: ToolCall) -> ToolResult:
        """Execute one call; every failure becomes a result the model can read."""
        started = time.monotonic()
        tool = self.tools.get(call.name)
        if tool is None:
            return ToolResult(call, f"error: there is no tool named {call.name!r}", False)
        if json_nesting(call.arguments or "") > MAX_DEPTH:  # a model's text: the parser must not recurse unbounded
            return ToolResult(call, f"error: the arguments are not valid JSON (they nest deeper than {MAX_DEPTH} "
                                    f"levels)", False)
        try:
            arguments = json.loads(call.arguments or "{}")
            if not isinstance(arguments, dict):
                raise ValueError("arguments must be a JSON object")
        except ValueError as exc:
            return ToolResult(call, f"error: the arguments are not valid JSON ({exc})", False)
        try:
            value = tool.function(**arguments)
            content = value if isinstance(value, str) else json.dumps(value, default=str)
            return ToolResult(call, content, True, time.monotonic() - started)
        except Exception as exc:  # the model is told; the request goes on
            return ToolResult(call, f"error: {type(exc).__name__}: {exc}", False, time.monotonic() - started)


# The tools `@tool` declares (the built-in ones below, and the application's): every app takes
# a copy when it is built (ChatService.build), so a tool registered later is not in it, and
# nothing one app does to its tools reaches another app of the process.
toolbox = Toolbox()
tool = toolbox.register


# ------------------------------------------------------------------ the round loop


def answer_deltas(provider: Provider, task: Task, cancel: Cancellation, tools: list[Tool] | None = None,
                  max_rounds: int = 4, records: list[dict[str, Any]] | None = None,
                  exchange: list[dict[str, Any]] | None = None) -> Iterator[Delta]:
    """The deltas of one answer: straight from the provider, or through tool rounds."""
    if tools:
        return stream_with_tools(provider, task, cancel, tools, max_rounds, records if records is not None else [],
                                 exchange if exchange is not None else [])
    return provider.stream(task, cancel)


def stream_with_tools(provider: Provider, task: Task, cancel: Cancellation, tools: list[Tool],
                      max_rounds: int, records: list[dict[str, Any]],
                      exchange: list[dict[str, Any]]) -> Iterator[Delta]:
    """Deltas of the final answer, running tool rounds in between (at most `max_rounds`).

    When the model still asks for tools after the last round, it is called once more
    without tools, so it has to answer with what it has. `records` collects what each
    tool did (for people), `exchange` the rounds as neutral messages (for later turns).
    """
    task = replace(task, messages=list(task.messages), tools=[t.schema() for t in tools])
    box = Toolbox(tools)
    for round_number in range(max_rounds + 1):
        if round_number == max_rounds:
            task = replace(task, tools=[])
            yield Meta({"tool": {"status": "round_limit", "rounds": max_rounds}})
        calls: list[ToolCall] = []
        text: list[str] = []
        thoughts: list[str] = []
        # Held until the round ends: a round with tool calls keeps them on its assistant turn
        # (they go back in the next round), the final round hands them to the answer.
        signed: list[Signed] = []
        for delta in provider.stream(task, cancel):
            if type(delta) is ToolCall:
                calls.append(delta)
                continue
            if type(delta) is Signed:
                signed.append(delta)
                continue
            if type(delta) is Finish and calls:
                continue  # "tool_calls" is not how the answer ends
            if type(delta) is Text:
                text.append(delta.text)
            elif type(delta) is Reasoning:
                thoughts.append(delta.text)
            yield delta
        if not calls or cancel.is_set():
            yield from signed
            return
        results = []
        for call in calls:
            yield Meta({"tool": {"id": call.id, "name": call.name, "arguments": call.arguments, "status": "running"}})
            result = box.run(call)
            results.append(result)
            records.append(result.record())
            yield Meta({"tool": {"id": call.id, "name": call.name, "arguments": call.arguments,
                                 "status": "done" if result.ok else "error",
                                 "result_preview": result.content[:PREVIEW_CHARS], "result": result.content}})
        round_messages = tool_round_messages("".join(text), results, "".join(thoughts), signed)
        task.messages.extend(round_messages)
        exchange.extend(round_messages)


def neutral_call(call: ToolCall) -> dict[str, Any]:
    """A tool call as the neutral messages carry it (its provider's signature, if any, with it)."""
    out: dict[str, Any] = {"id": call.id, "name": call.name, "arguments": call.arguments}
    if call.signature:
        out["signature"] = call.signature
    return out


def tool_round_messages(text: str, results: list[ToolResult], reasoning: str = "",
                        signed: list[Signed] | None = None) -> list[dict[str, Any]]:
    """A tool round in the provider-neutral message format (each adapter translates it):
    the assistant's turn with its calls (and its reasoning and signed items, which the
    provider that made them gets back), then one `tool` message per result."""
    turn: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": [neutral_call(r.call) for r in results]}
    if reasoning:
        turn["reasoning"] = reasoning
    if signed:
        turn["signed"] = [{"provider": s.provider, "item": s.item} for s in signed]
    return [turn] + [
        {"role": "tool", "tool_call_id": r.call.id, "name": r.call.name, "content": r.content, "is_error": not r.ok}
        for r in results]


# ------------------------------------------------------------------ built-in tools

_OPERATORS: dict[type[ast.AST], Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError("only numbers and + - * / // % ** ( ) are allowed")


@tool
def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses)."""
    if len(expression) > 200:
        raise ValueError("expression too long")
    return _evaluate(ast.parse(expression, mode="eval"))


@tool
def current_time(timezone: str = "UTC") -> str:
    """The current date and time in an IANA time zone such as Europe/Berlin."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    return datetime.now(zone).isoformat(timespec="seconds")
