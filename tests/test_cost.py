"""Prices and context sizes: the shipped table, lookups through snapshots and aliases, overrides and cost maths."""

from __future__ import annotations

import pytest

from backfill.cost import ModelLimits, Price, PriceTable, context_limit
from backfill.errors import SpecError

REQUIRED = [
    "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
    "gpt-5", "gpt-5-mini", "gpt-5-nano", "text-embedding-3-small", "text-embedding-3-large",
    "text-embedding-ada-002", "claude-opus-4-1", "claude-sonnet-4-5", "claude-sonnet-4",
    "claude-haiku-4-5", "claude-3-5-haiku", "gemini-2.5-pro", "gemini-2.5-flash",
    "gemini-2.5-flash-lite", "gemini-2.0-flash", "sim-chat", "sim-embed", "o1", "o3-mini",
]  # fmt: skip


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.builtin()


def test_builtin_table_has_every_model(table: PriceTable) -> None:
    for model in REQUIRED:
        price = table.get(model)
        assert price is not None, model
        assert price.input > 0 and price.output >= 0
        assert price.cached_input is None or price.cached_input < price.input
        assert 0 <= price.batch_discount < 1
    assert table.get("gpt-4o-mini") == Price(input=0.15, output=0.60, cached_input=0.075, batch_discount=0.5)
    assert table.get("sim-chat") == table.get("gpt-4o-mini")
    assert table.get("sim-embed") == table.get("text-embedding-3-small")
    assert table.get("claude-sonnet-4-5").batch_discount == 0.5
    assert set(REQUIRED) <= set(table.models())


def test_lookup_through_snapshots_and_aliases(table: PriceTable) -> None:
    assert table.get("gpt-4o-mini-2024-07-18") == table.get("gpt-4o-mini")
    assert table.get("claude-3-5-haiku-20241022") == table.get("claude-3-5-haiku")
    assert table.get("claude-3-5-haiku-latest") == table.get("claude-3-5-haiku")
    assert table.get("claude-sonnet-4-5-20250929") == table.get("claude-sonnet-4-5")
    assert table.get("claude-sonnet-4-0") == table.get("claude-sonnet-4")
    assert table.get("models/gemini-2.5-flash") == table.get("gemini-2.5-flash")
    # A snapshot with a price of its own is not collapsed onto the family's.
    assert table.get("gpt-4o-2024-05-13") != table.get("gpt-4o")
    # No prefix guessing: a different model is not "close enough".
    assert table.get("gpt-4o-mini-turbo") is None
    assert table.get("gpt-4") is None
    assert table.get("") is None


def test_cost_maths(table: PriceTable) -> None:
    # gpt-4o: 2.50 in, 1.25 cached, 10.00 out per 1M; input counts include cached tokens.
    assert table.cost("gpt-4o", 1_000_000, 0) == pytest.approx(2.50)
    assert table.cost("gpt-4o", 2_000, 1_000) == pytest.approx(0.005 + 0.010)
    assert table.cost("gpt-4o", 1_000_000, 100_000, cached_tokens=400_000) == pytest.approx(
        0.6 * 2.5 + 0.4 * 1.25 + 1.0
    )
    assert table.cost("gpt-4o", 1_000_000, 100_000, batch=True) == pytest.approx((2.5 + 1.0) / 2)
    # More cached than input (a provider quirk) never makes the cost negative or larger than all-cached.
    assert table.cost("gpt-4o", 1_000, 0, cached_tokens=5_000) == pytest.approx(1_000 * 1.25e-6)
    # No cached price: cached tokens cost the input price.
    assert table.cost("text-embedding-3-small", 1_000_000, 0, cached_tokens=1_000_000) == pytest.approx(0.02)
    assert table.cost("gpt-4o-mini-2024-07-18", 0, 1_000_000) == pytest.approx(0.60)
    with pytest.raises(SpecError, match="'my-model' has no known price"):
        table.cost("my-model", 1, 1)


def test_overrides(table: PriceTable) -> None:
    custom = table.with_overrides(
        {
            "gpt-4o-mini": {"input": 0.1, "cached_input": None},  # partial: the rest from the known price
            "my-llama": {"input": 0.2, "output": 0.4},
            "claude-haiku-4-5": Price(input=2.0, output=6.0),
        }
    )
    assert custom.get("gpt-4o-mini") == Price(input=0.1, output=0.60, cached_input=0.075, batch_discount=0.5)
    assert custom.get("gpt-4o-mini-2024-07-18") == custom.get("gpt-4o-mini")
    assert custom.get("my-llama") == Price(input=0.2, output=0.4)
    assert custom.cost("my-llama", 1_000_000, 1_000_000, batch=True) == pytest.approx(0.6)
    assert custom.get("claude-haiku-4-5") == Price(input=2.0, output=6.0)
    assert table.get("gpt-4o-mini").input == 0.15  # the original is untouched
    with pytest.raises(SpecError, match="needs both input and output"):
        table.with_overrides({"new-model": {"input": 1.0}})
    with pytest.raises(SpecError, match="unknown field"):
        table.with_overrides({"gpt-4o": {"inptu": 1.0}})
    with pytest.raises(SpecError, match="cannot be negative"):
        table.with_overrides({"gpt-4o": {"input": -1}})
    with pytest.raises(SpecError, match="between 0 and 1"):
        Price(input=1, output=1, batch_discount=50)


def test_every_model_has_its_context_size(table: PriceTable) -> None:
    for model in table.models():
        limits = table.limits(model)
        assert limits.context_tokens, model
        assert limits.max_output_tokens is None or limits.max_output_tokens < limits.context_tokens, model
        if model.startswith(("text-embedding", "sim-embed")):
            assert (limits.context_tokens, limits.max_output_tokens) == (8_191, None), model
        else:
            assert limits.max_output_tokens, model
    expected = {  # (context, max output) as the providers state them
        "gpt-4o": (128_000, 16_384), "gpt-4o-mini": (128_000, 16_384), "gpt-4o-2024-05-13": (128_000, 4_096),
        "gpt-4.1-nano": (1_047_576, 32_768), "o1": (200_000, 100_000), "o4-mini": (200_000, 100_000),
        "gpt-5-mini": (400_000, 128_000), "claude-sonnet-4-5": (200_000, 64_000), "claude-opus-4-1": (200_000, 32_000),
        "claude-3-5-haiku": (200_000, 8_192), "gemini-2.5-pro": (1_048_576, 65_536), "sim-chat": (128_000, 16_384),
    }  # fmt: skip
    for model, (context, output) in expected.items():
        assert (table.context_tokens(model), table.max_output_tokens(model)) == (context, output), model


def test_context_size_lookup_sees_through_snapshots_and_aliases(table: PriceTable) -> None:
    assert table.context_tokens("gpt-4o-mini-2024-07-18") == 128_000
    assert table.max_output_tokens("gpt-4o-2024-08-06") == 16_384  # the family's, not the first snapshot's 4,096
    assert table.max_output_tokens("gpt-4o-2024-05-13") == 4_096
    assert table.context_tokens("claude-sonnet-4-0") == table.context_tokens("claude-3-5-haiku-latest") == 200_000
    assert table.context_tokens("models/gemini-2.5-flash") == 1_048_576
    # gpt-5-chat-latest is priced as gpt-5 but holds a third of its context.
    assert table.get("gpt-5-chat-latest") == table.get("gpt-5")
    assert (table.context_tokens("gpt-5-chat-latest"), table.context_tokens("gpt-5")) == (128_000, 400_000)
    assert table.context_tokens("my-llama") is None and table.limits("my-llama") == ModelLimits()
    # A job's price override keeps the model's context size.
    assert table.with_overrides({"gpt-4o": {"input": 1.0}}).context_tokens("gpt-4o") == 128_000


def test_a_job_overrides_the_context_size(table: PriceTable) -> None:
    assert context_limit(table, "gpt-4o-mini", None) == 128_000
    assert context_limit(table, "gpt-4o-mini", 32_000) == 32_000
    assert context_limit(table, "my-llama", 8_192) == 8_192
    assert context_limit(table, "my-llama", None) is None
    for bad in (0, -5, 1.5):
        with pytest.raises(SpecError, match="positive whole number"):
            context_limit(table, "gpt-4o", bad)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="exceeds the context_tokens"):
        ModelLimits(context_tokens=1_000, max_output_tokens=4_096)
