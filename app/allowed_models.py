"""Which models a caller may name, per provider (`ALLOWED_MODELS`).

Without a list, any name a client sent was forwarded: a costly model the operator never
meant to offer, or a made-up name whose refusal was then failed over. By default a
provider offers the models it lists (`/v1/models`, `/api/capabilities`), its configured
default (`LLM_MODEL`) and the targets of `MODEL_ALIASES`, so a deployment that uses its
configured models works as before. `ALLOWED_MODELS` adds to that:
`"openai/gpt-4.1,anthropic/*"` (`provider/*`: any name for that provider; `*`: any name
for every provider, the behaviour before the list existed). Fallbacks are the operator's
choice, not the caller's: they are never checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.config import Settings
from app.errors import ApiError
from app.providers import Provider

ANY = "*"


class AllowedModels:
    """Per provider, the model names a request may carry (None: any)."""

    def __init__(self, allowed: Mapping[str, frozenset[str] | None]) -> None:
        self.allowed = dict(allowed)

    @classmethod
    def from_settings(cls, settings: Settings, providers: Mapping[str, Provider]) -> AllowedModels:
        """The defaults (listed, configured and aliased models) plus ALLOWED_MODELS; a malformed
        entry raises ValueError (refused at startup)."""
        from app.openai_api import parse_aliases  # that module builds on the service, which builds on this

        names: dict[str, set[str] | None] = {name: {*p.models, p.default_model} for name, p in providers.items()}
        targets = list(parse_aliases(settings.MODEL_ALIASES).values())
        extra = [item.strip() for item in settings.ALLOWED_MODELS.split(",") if item.strip()]
        for item in extra:
            if item == ANY:
                names = dict.fromkeys(names)
                continue
            provider, _, model = item.partition("/")
            if provider not in providers or not model:
                raise ValueError(f"ALLOWED_MODELS: {item!r} is not provider/model or provider/* of a provider this "
                                 f"server has ({', '.join(sorted(providers))}), or *")
        for item in [*targets, *extra]:
            provider, _, model = item.partition("/")
            known = names.get(provider)
            if known is None:
                continue  # any name already, or a provider this server lacks (an alias to it fails anyway)
            if model == ANY:
                names[provider] = None
            else:
                known.add(model)
        return cls({name: None if models is None else frozenset(models) for name, models in names.items()})

    def check(self, provider: str, model: str) -> None:
        """Refuse (400 model_not_allowed) a model this server does not offer for `provider`."""
        if provider not in self.allowed:
            return
        models = self.allowed[provider]
        if models is not None and model not in models:
            raise ApiError(400, "model_not_allowed", f"the model '{model[:100]}' is not offered for provider "
                                                     f"'{provider}' on this server (see /v1/models)")

    def named(self, provider: str) -> set[str]:
        """The names listed for `provider` (for bounded metric labels)."""
        return set(self.allowed.get(provider) or ())
