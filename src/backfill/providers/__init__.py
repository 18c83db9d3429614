"""Wire-protocol adapters, one per protocol, found by name in a small registry."""

from __future__ import annotations

from backfill.errors import SpecError
from backfill.providers.anthropic import AnthropicProvider
from backfill.providers.base import Provider
from backfill.providers.openai import AzureProvider, OpenAIProvider

_REGISTRY: dict[str, type[Provider]] = {p.name: p for p in (OpenAIProvider, AzureProvider, AnthropicProvider)}


def get_provider(name: str) -> type[Provider]:
    """The adapter class for a provider name ("openai", "azure", "anthropic")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise SpecError(f"Unknown provider '{name}'; use one of: {known}.") from None


__all__ = ["AnthropicProvider", "AzureProvider", "OpenAIProvider", "Provider", "get_provider"]
