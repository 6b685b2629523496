"""Failover: when a provider fails, the next one of `LLM_FALLBACKS` answers, mid-answer too.

A provider that fails before its first token (after its own retries) is replaced by the
next one in the chain, which answers the same task. One that fails mid-answer (an error
event, a reset, a stall) is replaced too, and the answer continues where it stopped: the
text so far goes to the next provider as the beginning of the assistant's turn (a
prefill for APIs that continue it, such as Anthropic's; for the others, an assistant
turn and an instruction to continue without repeating). The reader sees a `meta`
`{"failover": {...}}` event and more tokens, never an error, unless every provider of the
chain failed; the record keeps the whole answer and where each provider took over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from app.providers.base import Cancellation, Delta, Meta, Provider, ProviderError, Task, Text

CONTINUE = ("Your previous answer was cut off by a technical problem. Continue it exactly where it stopped, "
            "mid-sentence if need be: do not repeat anything already written and do not add an introduction.")


def parse_fallbacks(text: str, providers: dict[str, Provider]) -> list[tuple[Provider, str]]:
    """LLM_FALLBACKS "anthropic/claude-sonnet-4-5,openai/gpt-4.1-mini" as (provider, model) pairs."""
    chain = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, model = item.partition("/")
        provider = providers.get(name)
        if provider is None or not model:
            raise ValueError(f"LLM_FALLBACKS: {item!r} is not provider/model of a provider this server has "
                             f"({', '.join(sorted(providers))})")
        chain.append((provider, model))
    return chain


def continuation(task: Task, model: str, written: str, provider: Provider) -> Task:
    """The task for the next provider: the same request, with the answer so far as its beginning."""
    if not written:
        return replace(task, model=model)
    if getattr(provider, "supports_prefill", False):
        # A final assistant turn is continued as is (it may not end in white space).
        return replace(task, model=model, messages=[*task.messages, {"role": "assistant", "content": written.rstrip()}])
    return replace(task, model=model, messages=[*task.messages, {"role": "assistant", "content": written},
                                                {"role": "user", "content": CONTINUE}])


class FailoverProvider(Provider):
    """The request's provider, then each fallback (skipping the same provider and model)."""

    def __init__(self, primary: Provider, fallbacks: list[tuple[Provider, str]]) -> None:
        self.primary = primary
        self.fallbacks = fallbacks
        self.name = primary.name
        self.default_model = primary.default_model
        self.models = primary.models

    @property
    def configured(self) -> bool:
        return self.primary.configured

    @property
    def idles(self) -> bool:
        return self.primary.idles and all(provider.idles for provider, _ in self.fallbacks)

    def stream(self, task: Task, cancel: Cancellation) -> Iterator[Delta]:
        chain: list[tuple[Provider, str]] = [(self.primary, task.model)]
        chain += [(p, m) for p, m in self.fallbacks if p.configured and (p.name, m) != (self.primary.name, task.model)]
        written: list[str] = []
        for i, (provider, model) in enumerate(chain):
            try:
                for delta in provider.stream(continuation(task, model, "".join(written), provider), cancel):
                    if delta.__class__ is Text:
                        written.append(delta.text)
                    yield delta
                return
            except ProviderError as err:
                if cancel.is_set() or i == len(chain) - 1:
                    raise
                successor, next_model = chain[i + 1]
                event: dict[str, Any] = {"from": f"{provider.name}/{model}", "to": f"{successor.name}/{next_model}",
                                         "reason": err.type, "after_chars": len("".join(written))}
                if err.status is not None:
                    event["status"] = err.status
                yield Meta({"failover": event})
