"""Token counts: the exact count, the quick guess used while the tokenizer loads, and the switch between them."""

from __future__ import annotations

import pytest

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
