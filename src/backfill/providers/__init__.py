"""Wire-protocol adapters, one per protocol, found by name in a small registry and opened for a job."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from backfill.errors import SpecError
from backfill.providers.anthropic import AnthropicProvider
from backfill.providers.base import Provider
from backfill.providers.openai import AzureProvider, OpenAIProvider
from backfill.providers.sim import SimProvider
from backfill.providers.structured import StructuredMode

_REGISTRY: dict[str, type[Provider]] = {
    p.name: p for p in (OpenAIProvider, AzureProvider, AnthropicProvider, SimProvider)
}


def get_provider(name: str) -> type[Provider]:
    """The adapter class for a provider name ("openai", "azure", "anthropic", "sim")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise SpecError(f"Unknown provider '{name}'; use one of: {known}.") from None


@asynccontextmanager
async def open_provider(
    name: str, *, base_url: str | None, api_key: str | None, timeout_s: float, max_connections: int
) -> AsyncIterator[Provider]:
    """The provider for a job, open; with no base URL, an adapter that `starts_simulator` gets the
    built-in simulator, started in this process and closed with the provider."""
    cls = get_provider(name)
    async with AsyncExitStack() as stack:
        if base_url is None and cls.starts_simulator:
            # Imported here: the simulator's web server is a tenth of start-up for jobs that never use it.
            from backfill.sim import Simulator, builtin_sim_config

            sim = await stack.enter_async_context(Simulator(builtin_sim_config()))
            base_url = sim.base_url
        provider = cls(base_url=base_url, api_key=api_key, timeout_s=timeout_s, max_connections=max_connections)
        yield await stack.enter_async_context(provider)


__all__ = [
    "AnthropicProvider",
    "AzureProvider",
    "OpenAIProvider",
    "Provider",
    "SimProvider",
    "StructuredMode",
    "get_provider",
    "open_provider",
]
