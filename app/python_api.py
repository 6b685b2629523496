"""The Python API for app authors: `ask_stream()`, `ask()` and the `task()` builder.

Inside a Flask app made by `create_app()` (or given the relay by `init_app(app)`) they use
that app's service; anywhere else, the service of an app built once by `create_app()` from
the environment, checked the same way. Options are validated by the same rules as the HTTP
API (`ApiError` on bad input).

    from app.python_api import ask_stream, task

    for piece in ask_stream("Name three rivers", provider="openai"):
        print(piece, end="", flush=True)

    @bp.get("/haiku")
    def haiku():
        return task().system("You write haiku.").prompt(request.args["topic"]).stream()
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, current_app, g, has_app_context, has_request_context, request

from app.access import Caller
from app.chat_request import ChatRequest
from app.routes import EXTENSION, chat_service
from app.service import ChatService

# Outside any request (a script, a worker job): the application itself is the caller.
LOCAL = Caller("local:python-api", True)
# The app a script uses when no Flask app is current, made on first use.
_script_app: Flask | None = None
_script_app_lock = threading.Lock()


def current_service() -> ChatService:
    """The front door of the current Flask app; outside one (a script, a worker job), that of
    an app built once by the factory from the environment."""
    global _script_app
    if has_app_context() and EXTENSION in current_app.extensions:
        return chat_service()
    with _script_app_lock:
        if _script_app is None:
            from app.factory import create_app  # the factory imports every route module

            _script_app = create_app()
        service: ChatService = _script_app.extensions[EXTENSION]
        return service


def current_caller() -> Caller:
    """Who the limits count: the authenticated caller of this request, else its client address."""
    if not has_request_context():
        return LOCAL
    caller = g.get("caller")
    return caller if caller is not None else Caller(current_service().access.client_id(request), False)


def _chat(options: dict[str, Any]) -> tuple[ChatService, Caller, ChatRequest]:
    service, caller = current_service(), current_caller()
    options = {k: v for k, v in options.items() if v is not None}
    return service, caller, service.accept(caller, options)


class ProviderClient:
    """A client bound to one provider (default: `LLM_PROVIDER`) and model."""

    def __init__(self, provider: str | None = None, model: str | None = None) -> None:
        self.provider = provider
        self.model = model

    def ask_stream(self, prompt: str, **options: Any) -> Iterator[str]:
        """The answer's text pieces as they arrive; closing the iterator stops the call."""
        service, caller, chat = _chat({"provider": self.provider, "model": self.model, "prompt": prompt, **options})
        return service.text_stream(caller, chat)

    def ask(self, prompt: str, **options: Any) -> str:
        """The whole answer's text."""
        service, caller, chat = _chat({"provider": self.provider, "model": self.model, "prompt": prompt, **options})
        return service.answer(caller, chat, transport="python")[2].text


def ask_stream(prompt: str, provider: str | None = None, model: str | None = None, **options: Any) -> Iterator[str]:
    """Stream the answer to `prompt` as text pieces (options as in the HTTP API)."""
    return ProviderClient(provider, model).ask_stream(prompt, **options)


def ask(prompt: str, provider: str | None = None, model: str | None = None, **options: Any) -> str:
    """The whole answer to `prompt`."""
    return ProviderClient(provider, model).ask(prompt, **options)


class TaskBuilder:
    """`task().system(…).message(role, content).prompt(…).model(…)…` then `.stream()` or `.ask()`."""

    def __init__(self, provider: str | None = None) -> None:
        self._options: dict[str, Any] = {"provider": provider}
        self._messages: list[dict[str, Any]] = []

    def provider(self, name: str) -> TaskBuilder:
        self._options["provider"] = name
        return self

    def system(self, text: str) -> TaskBuilder:
        self._options["system"] = text
        return self

    def message(self, role: str, content: str | list[dict[str, Any]]) -> TaskBuilder:
        """A message; a user's `content` may be a list of `text` and `image_url` parts, as in
        the HTTP API (checked the same way)."""
        self._messages.append({"role": role, "content": content})
        return self

    def prompt(self, text: str) -> TaskBuilder:
        return self.message("user", text)

    def model(self, name: str) -> TaskBuilder:
        self._options["model"] = name
        return self

    def temperature(self, value: float) -> TaskBuilder:
        self._options["temperature"] = value
        return self

    def max_tokens(self, value: int) -> TaskBuilder:
        self._options["max_tokens"] = value
        return self

    def reasoning(self, level: str) -> TaskBuilder:
        """Ask the model to think first: "low", "medium" or "high" (docs/http-api.md)."""
        self._options["reasoning"] = level
        return self

    def _chat(self) -> tuple[ChatService, Caller, ChatRequest]:
        return _chat({**self._options, "messages": list(self._messages)})

    def stream(self) -> Response:
        """A Flask SSE response with the full event protocol (msgid, token, …, done), through
        the front door: the caller's rate limit and stream cap, and a recorded conversation."""
        service, caller, chat = self._chat()
        reading = service.stream(caller, chat, transport="python")
        return service.sse(reading)

    def ask(self) -> str:
        service, caller, chat = self._chat()
        return service.answer(caller, chat, transport="python")[2].text

    def ask_stream(self) -> Iterator[str]:
        service, caller, chat = self._chat()
        return service.text_stream(caller, chat)


def task(provider: str | None = None) -> TaskBuilder:
    """Start building a request; end with `.stream()` (a response) or `.ask()` (the text)."""
    return TaskBuilder(provider)
