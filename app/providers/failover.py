"""Failover: when a provider fails, the next one of `LLM_FALLBACKS` answers, mid-answer too.

Only where another provider can help: a provider that could not be reached, timed out,
broke off, was rate limited or failed (429, 5xx) is replaced; a refusal the request caused
(400, 404, 422, …) or of this server's key (401, 403) is the answer's error, never a way to
reach the next provider. Each request has one budget, whatever its tool rounds: every
provider of the chain is called at most once per round, only the last one retries (from
the request's `UPSTREAM_MAX_RETRIES`), and once a provider took over, the following tool
rounds go to it.

A provider that fails before its first token is replaced by the
next one in the chain, which answers the same task. One that fails mid-answer (an error
event, a reset, a stall) is replaced too, and the answer continues where it stopped: the
text so far goes to the next provider as the beginning of the assistant's turn (a
prefill for APIs that continue it, such as Anthropic's; for the others, an assistant
turn and an instruction to continue without repeating). The reader sees a `meta`
`{"failover": {"from", "to", "reason", "after_chars"}}` event (our words: the upstream's
status and message go to the log) and more tokens, never an error, unless every provider
of the chain failed; the record keeps the whole answer and where each provider took over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from app.providers.domain import Cancellation, Delta, Meta, Provider, ProviderError, Task, Text
from app.providers.transport import RetryBudget, retrying

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
    if provider.supports_prefill:
        # A final assistant turn is continued as is (it may not end in white space).
        return replace(task, model=model, messages=[*task.messages, {"role": "assistant", "content": written.rstrip()}])
    return replace(task, model=model, messages=[*task.messages, {"role": "assistant", "content": written},
                                                {"role": "user", "content": CONTINUE}])


class FailoverProvider(Provider):
    """One request's upstream: the request's provider, then each fallback (skipping the same
    provider and model), with that request's retry budget. Made per request: it remembers,
    across tool rounds, which provider answers and what is left of the budget."""

    def __init__(self, primary: Provider, fallbacks: list[tuple[Provider, str]], retries: int = 0) -> None:
        self.primary = primary
        self.fallbacks = fallbacks
        self.name = primary.name
        self.default_model = primary.default_model
        self.models = primary.models
        self.budget = RetryBudget(retries)
        self.serving = 0  # which link of the chain answers (a later round starts there)

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
        while True:
            provider, model = chain[self.serving]
            last = self.serving == len(chain) - 1
            attempt = continuation(task, model, "".join(written), provider)
            # A fallback ready is the retry: only the chain's last provider repeats a call.
            deltas = retrying(provider, attempt, cancel, self.budget) if last else provider.attempt(attempt, cancel)
            try:
                for delta in deltas:
                    if delta.__class__ is Text:
                        written.append(delta.text)
                    yield delta
                return
            except ProviderError as err:
                if cancel.is_set() or last or not err.upstream_fault:
                    raise
                self.serving += 1
                successor, next_model = chain[self.serving]
                yield Meta({"failover": {"from": f"{provider.name}/{model}", "to": f"{successor.name}/{next_model}",
                                         "reason": err.type, "after_chars": len("".join(written))}})
