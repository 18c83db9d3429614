"""Prices and context sizes per model, and the cost of a request's usage.

The built-in table ships as prices.toml beside this module; a job can override any price,
and its context size with `context_limit`'s override.
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


@dataclass(frozen=True)
class ModelLimits:
    """What one request to the model may hold, in tokens; None where the provider states no figure."""

    context_tokens: int | None = None  # prompt + output together (embeddings: the input)
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("context_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise SpecError(f"The model limit '{name}' is {value!r}; it must be a positive whole number of tokens.")
        if self.context_tokens and self.max_output_tokens and self.max_output_tokens > self.context_tokens:
            raise SpecError(
                f"The max_output_tokens {self.max_output_tokens} exceeds the context_tokens {self.context_tokens}; check the figures."
            )


_FIELDS = frozenset(f.name for f in dataclasses.fields(Price))
_LIMIT_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelLimits))


class PriceTable:
    """Model name → Price and ModelLimits, with lookups that see through dated snapshots and aliases."""

    def __init__(
        self,
        prices: Mapping[str, Price],
        aliases: Mapping[str, str] | None = None,
        limits: Mapping[str, ModelLimits] | None = None,
    ):
        self._prices = dict(prices)
        self._aliases = dict(aliases or {})
        self._limits = dict(limits or {})

    @classmethod
    def builtin(cls) -> PriceTable:
        """The table shipped with backfill (prices.toml)."""
        data = tomllib.loads(resources.files(__package__).joinpath("prices.toml").read_text(encoding="utf-8"))
        prices: dict[str, Price] = {}
        limits: dict[str, ModelLimits] = {}
        for name, fields in data["models"].items():
            # The limits sit beside the prices in the file, but a job overrides them apart (task.context_tokens).
            prices[name] = Price(**{k: v for k, v in fields.items() if k not in _LIMIT_FIELDS})
            given = {k: v for k, v in fields.items() if k in _LIMIT_FIELDS}
            if given:
                limits[name] = ModelLimits(**given)
        return cls(prices, data.get("aliases", {}), limits)

    def with_overrides(self, overrides: Mapping[str, Price | Mapping[str, Any]]) -> PriceTable:
        """A copy where each named model gets the given price; a partial mapping fills in from the known price."""
        prices = dict(self._prices)
        for model, override in overrides.items():
            prices[model] = override if isinstance(override, Price) else self._merge(model, override)
        return PriceTable(prices, self._aliases, self._limits)

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

    def _lookup(self, table: Mapping[str, Any], model: str) -> Any:
        for name in self._candidates(model):
            found = table.get(name) or table.get(self._aliases.get(name, ""))
            if found is not None:
                return found
        return None

    def get(self, model: str) -> Price | None:
        """The price of `model`: exact name, alias, then without its date or -latest suffix; else None."""
        return self._lookup(self._prices, model)

    def limits(self, model: str) -> ModelLimits:
        """The context and output sizes of `model`, found like its price; all None when unknown."""
        return self._lookup(self._limits, model) or ModelLimits()

    def context_tokens(self, model: str) -> int | None:
        """Tokens one request may hold, prompt and output together; None when unknown."""
        return self.limits(model).context_tokens

    def max_output_tokens(self, model: str) -> int | None:
        """The most output tokens one answer may have; None when the provider states no figure."""
        return self.limits(model).max_output_tokens

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


@dataclass(frozen=True)
class ModelInfo:
    """One model of the table as `backfill models` lists it."""

    model: str
    input: float
    output: float
    cached_input: float | None
    batch_discount: float
    context_tokens: int | None
    max_output_tokens: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def price_list(prices: PriceTable) -> list[ModelInfo]:
    """Every model with a price of its own, by name, with its context sizes."""
    infos = []
    for name in prices.models():
        price, limits = prices.get(name), prices.limits(name)
        assert price is not None  # models() lists priced names only
        infos.append(ModelInfo(
            name, price.input, price.output, price.cached_input, price.batch_discount, limits.context_tokens, limits.max_output_tokens,
        ))
    return infos


def context_limit(prices: PriceTable, model: str, override: int | None) -> int | None:
    """The context size a job holds its requests to: its own (task.context_tokens) when given, else the table's."""
    if override is None:
        return prices.context_tokens(model)
    if isinstance(override, bool) or not isinstance(override, int) or override <= 0:
        raise SpecError(f"The context size {override!r} must be a positive whole number of tokens (task.context_tokens).")
    return override
