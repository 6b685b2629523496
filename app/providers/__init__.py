"""The provider registry: which providers exist, their defaults, and how to build them.

Adding a provider is one adapter module (or a subclass with other defaults) and one
`ProviderSpec` line below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.providers.anthropic import AnthropicProvider
from app.providers.demo import DemoProvider
from app.providers.domain import Provider, ProviderError, Task
from app.providers.gemini import GeminiProvider
from app.providers.openai import CompatibleProvider, GroqProvider, MistralProvider, OpenAIProvider
from app.providers.openai_responses import OpenAIResponsesProvider
from app.providers.transport import HttpProvider, UpstreamPolicy


@dataclass(frozen=True)
class ProviderSpec:
    adapter: type[HttpProvider]
    key_env: str
    base_env: str
    base_url: str
    model: str
    models: tuple[str, ...] = ()


SPECS: dict[str, ProviderSpec] = {
    "openai": ProviderSpec(OpenAIProvider, "OPENAI_API_KEY", "OPENAI_BASE_URL",
                           "https://api.openai.com/v1", "gpt-4.1-mini", ("gpt-4.1-mini", "gpt-4.1", "gpt-4o-mini")),
    "anthropic": ProviderSpec(AnthropicProvider, "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                              "https://api.anthropic.com", "claude-sonnet-4-5",
                              ("claude-sonnet-4-5", "claude-haiku-4-5")),
    "groq": ProviderSpec(GroqProvider, "GROQ_API_KEY", "GROQ_BASE_URL",
                         "https://api.groq.com/openai/v1", "llama-3.3-70b-versatile"),
    "mistral": ProviderSpec(MistralProvider, "MISTRAL_API_KEY", "MISTRAL_BASE_URL",
                            "https://api.mistral.ai/v1", "mistral-small-latest"),
    "gemini": ProviderSpec(GeminiProvider, "GEMINI_API_KEY", "GEMINI_BASE_URL",
                           "https://generativelanguage.googleapis.com/v1beta", "gemini-2.5-flash",
                           ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-3-flash-preview", "gemini-3-pro-preview")),
    # Local servers: OPENAI_COMPATIBLE_BASE_URL, or Ollama's /v1 under OLLAMA_BASE_URL.
    "openai-compatible": ProviderSpec(CompatibleProvider, "OPENAI_COMPATIBLE_API_KEY", "OPENAI_COMPATIBLE_BASE_URL",
                                      "", "llama3.2"),
}

# The adapter of the `openai` provider for each OPENAI_API setting.
OPENAI_APIS: dict[str, type[HttpProvider]] = {"chat": OpenAIProvider, "responses": OpenAIResponsesProvider}


def build_providers(env: Mapping[str, Any], settings: Settings) -> dict[str, Provider]:
    """The providers this server has, built from the environment; `configured` says which can run.

    Hosted providers are always known (a request for one without its key is told so);
    `openai-compatible` exists only when a base URL points it at a server, and `demo`
    only while it is the default or DEMO_ENABLED says so: it answers from this
    server's CPU, which nobody should be able to spend beside a paid provider.
    """
    policy = UpstreamPolicy.from_settings(settings)
    providers: dict[str, Provider] = {}
    if settings.demo_enabled:
        chosen = settings.LLM_PROVIDER == "demo" and settings.LLM_MODEL
        providers["demo"] = DemoProvider(settings.DEMO_TOKENS_PER_SECOND, settings.DEMO_FIRST_TOKEN_DELAY,
                                         settings.LLM_MODEL if chosen else DemoProvider.default_model)
    for name, spec in SPECS.items():
        base = env.get(spec.base_env) or ""
        if name == "openai-compatible" and not base and env.get("OLLAMA_BASE_URL"):
            base = str(env["OLLAMA_BASE_URL"]).rstrip("/") + "/v1"
        if name == "openai-compatible" and not base:
            continue  # a local server nobody named: there is nothing to call
        model = spec.model
        if settings.LLM_PROVIDER == name and settings.LLM_MODEL:
            model = settings.LLM_MODEL
        adapter = OPENAI_APIS[settings.OPENAI_API] if name == "openai" else spec.adapter
        providers[name] = adapter(name, base or spec.base_url, env.get(spec.key_env), model, policy, spec.models)
    return providers


__all__ = ["SPECS", "Provider", "ProviderError", "Task", "build_providers"]
