"""The words that travel between layers: a request (what one row becomes) and its outcome.

The engine builds Requests (via `prompt`), providers turn them into HTTP calls and
return Outcomes; neither side knows the other's internals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from backfill.tokens import count_messages, count_text, guess_messages, loaded


@dataclass(slots=True)
class Request:
    """One row's request.

    `key` is the request key: a hash of everything that affects the answer
    (provider, model, messages or input, parameters, schema). Identical keys are
    answered once.
    """

    key: str
    kind: Literal["chat", "embedding"]
    model: str
    messages: list[dict[str, Any]] | None = None  # chat: [{"role": ..., "content": ...}]
    input: str | None = None  # embedding: the text of this row
    params: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, seed, top_p, stop, ...
    schema: dict[str, Any] | None = None  # JSON Schema of the structured output, if any
    schema_name: str = "output"
    max_output_tokens: int = 0  # what the provider counts against the output/token limit
    counted_tokens: int | None = None  # the prompt's tokens once counted; see prompt_tokens

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens as the provider bills them, counted on first use: only token limits,
        budgets and embedding packing need them, and counting is a fair part of a request's CPU."""
        if self.counted_tokens is None:
            if self.messages is not None:
                self.counted_tokens = count_messages(self.messages, self.model)
            else:
                self.counted_tokens = count_text(self.input or "", self.model)
        return self.counted_tokens

    def pacing_tokens(self) -> int:
        """`prompt_tokens`, or a quick guess until the tokenizer is loaded: pacing need not wait for
        it, since the limiter charges each answer's real usage when it comes back."""
        if self.counted_tokens is None and self.messages is not None and not loaded():
            return guess_messages(self.messages, self.model)
        return self.prompt_tokens


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


class OutcomeKind(str, enum.Enum):
    OK = "ok"
    RETRY = "retry"  # transient: 5xx, 408, 529, timeouts, resets, malformed bodies
    RATE_LIMITED = "rate_limited"  # 429: pause the lane, re-queue without using an attempt
    BAD_ROW = "bad_row"  # permanent for this row: becomes a dead letter
    FATAL = "fatal"  # stops the job: bad key, unknown model, quota exhausted


@dataclass(slots=True)
class RateLimitInfo:
    """What the provider's rate-limit headers said. Anything not sent is None.

    OpenAI sends requests and tokens; Anthropic sends requests, input tokens and
    output tokens. Reset values are seconds from now.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    limit_input_tokens: int | None = None
    remaining_input_tokens: int | None = None
    reset_input_tokens_s: float | None = None
    limit_output_tokens: int | None = None
    remaining_output_tokens: int | None = None
    reset_output_tokens_s: float | None = None


@dataclass(slots=True)
class Outcome:
    """The classified result of sending one request (or one packed embedding call)."""

    kind: OutcomeKind
    status: int = 0  # HTTP status, 0 when no response arrived
    text: str | None = None  # chat: the answer text (JSON text when a schema was asked for)
    embeddings: list[list[float]] | None = None  # embedding: one vector per input, in order
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None  # one sentence, never containing a secret
    retry_after: float | None = None  # seconds the provider asked us to wait
    rate: RateLimitInfo | None = None
    # A schema request's structured-output mode that produced this outcome; the engine persists a change.
    structured_mode: str | None = None
    quota: bool = False  # FATAL because the account's quota or credit is exhausted
    code: str | None = None  # the error body's code or type, when it has one
