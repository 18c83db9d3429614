"""Prices per model (USD per 1M tokens) and the cost of a request's usage.

The built-in table ships as prices.toml beside this module; a job can override any entry.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from backfill.errors import SpecError

_PER_TOKEN = 1e-6
# Provider snapshots append a date: gpt-4o-mini-2024-07-18, claude-3-5-haiku-20241022.
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
_LATEST_SUFFIX = "-latest"


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens; cached_input None means cached tokens are billed as input."""

    input: float
    output: float
    cached_input: float | None = None
    batch_discount: float = 0.0  # fraction off with the batch APIs, e.g. 0.5

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SpecError(f"The price field '{name}' is {value}; prices cannot be negative.")
        if not 0.0 <= self.batch_discount <= 1.0:
            raise SpecError(f"The batch_discount {self.batch_discount} must be a fraction between 0 and 1.")

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0, batch: bool = False) -> float:
        """USD for one usage. `input_tokens` includes `cached_tokens` (OpenAI's convention)."""
        cached = min(max(cached_tokens, 0), input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        usd = ((input_tokens - cached) * self.input + cached * cached_rate + output_tokens * self.output) * _PER_TOKEN
        return usd * (1.0 - self.batch_discount) if batch else usd


_FIELDS = frozenset(f.name for f in dataclasses.fields(Price))


class PriceTable:
    """Model name → Price, with lookups that see through dated snapshots and aliases."""

    def __init__(self, prices: Mapping[str, Price], aliases: Mapping[str, str] | None = None):
        self._prices = dict(prices)
        self._aliases = dict(aliases or {})

    @classmethod
    def builtin(cls) -> PriceTable:
        """The table shipped with backfill (prices.toml)."""
        data = tomllib.loads(resources.files(__package__).joinpath("prices.toml").read_text(encoding="utf-8"))
        prices = {name: Price(**fields) for name, fields in data["models"].items()}
        return cls(prices, data.get("aliases", {}))

    def with_overrides(self, overrides: Mapping[str, Price | Mapping[str, Any]]) -> PriceTable:
        """A copy where each named model gets the given price; a partial mapping fills in from the known price."""
        prices = dict(self._prices)
        for model, override in overrides.items():
            prices[model] = override if isinstance(override, Price) else self._merge(model, override)
        return PriceTable(prices, self._aliases)

    def _merge(self, model: str, fields: Mapping[str, Any]) -> Price:
        unknown = sorted(set(fields) - _FIELDS)
        if unknown:
            raise SpecError(
                f"The price for '{model}' has unknown field(s) {', '.join(unknown)}; use {', '.join(sorted(_FIELDS))}."
            )
        given = {k: v for k, v in fields.items() if v is not None}
        base = self.get(model)
        if base is None and not {"input", "output"} <= given.keys():
            raise SpecError(f"The price for '{model}' needs both input and output (USD per 1M tokens).")
        merged = dataclasses.asdict(base) if base is not None else {}
        merged.update(given)
        return Price(**merged)

    def _candidates(self, model: str) -> Iterator[str]:
        yield model
        name = model.rsplit("/", 1)[-1]  # "models/gemini-2.5-pro", "openai/gpt-4o"
        yield name
        name = name.removesuffix(_LATEST_SUFFIX)
        yield name
        yield _DATE_SUFFIX.sub("", name)

    def get(self, model: str) -> Price | None:
        """The price of `model`: exact name, alias, then without its date or -latest suffix; else None."""
        for name in self._candidates(model):
            price = self._prices.get(name) or self._prices.get(self._aliases.get(name, ""))
            if price is not None:
                return price
        return None

    def cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        batch: bool = False,
    ) -> float:
        """USD for one usage. `input_tokens` includes `cached_tokens` (OpenAI's convention)."""
        price = self.get(model)
        if price is None:
            raise SpecError(f"Model '{model}' has no known price; add its input and output prices to the job file.")
        return price.cost(input_tokens, output_tokens, cached_tokens, batch)

    def models(self) -> list[str]:
        """The model names with a price of their own (aliases and snapshots not listed)."""
        return sorted(self._prices)
