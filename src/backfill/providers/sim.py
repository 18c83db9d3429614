"""The built-in simulator as a provider: the OpenAI protocol with the simulator's own facts."""

from __future__ import annotations

from backfill.providers.openai import OpenAIProvider


class SimProvider(OpenAIProvider):
    """The simulator speaks OpenAI's protocol; it takes no key and bills nothing. Without a base URL,
    `open_provider` starts one in this process (the quickstart's default)."""

    name = "sim"
    default_base_url = None
    key_env = None
    needs_key = False
    cloud_hosts = ()
    starts_simulator = True

    @classmethod
    def needs_price(cls, base_url: str | None) -> bool:
        return False
