"""The outcome policy: what to do with a request's outcome, as a pure function of the outcome and the row's history.

The runner acts on the decision; nothing here touches the queue, the limiter or the store.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from backfill.request import Outcome, OutcomeKind
from backfill.spec import RetrySpec
from backfill.status import StopCause

# When the same failure repeats this many times before any request has succeeded, it is the
# request that is wrong (a bad parameter, a schema the server rejects, a deterministic 500),
# not the rows: stop instead of retrying or dead-lettering the whole table.
EARLY_REPEATS = 20


@dataclass(frozen=True, slots=True)
class Accept:
    """The answer arrived: decode it."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: send again after `delay_s`, one attempt used."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class Requeue:
    """Send again without using an attempt: a 429, or (`solo`) a packed call that must be split to find a bad input."""

    solo: bool = False


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


@dataclass(frozen=True, slots=True)
class Fatal:
    reason: str
    cause: StopCause = StopCause.FATAL


Decision = Accept | Retry | Requeue | DeadLetter | Fatal


def backoff_s(attempts: int, retries: RetrySpec, uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Exponential backoff with full jitter after `attempts` attempts."""
    return uniform(0, min(retries.backoff_max_s, retries.backoff_s * 2 ** (attempts - 1)))


def decide(
    outcome: Outcome,
    *,
    attempts: int,
    packed: bool,
    retries: RetrySpec,
    early_repeats: int,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Decision:
    """Decide for one outcome.

    `attempts` counts attempts including this one; `packed` says the request carried several rows;
    `early_repeats` is how often this same failure has come back while no request of the job has
    succeeded yet (0 once one has).
    """
    kind = outcome.kind
    if kind is OutcomeKind.OK:
        return Accept()
    if kind is OutcomeKind.RATE_LIMITED:
        return Requeue()
    if kind is OutcomeKind.FATAL:
        return Fatal(outcome.error or f"the provider refused the job ({outcome.status})", _cause(outcome))
    if early_repeats >= EARLY_REPEATS:
        return Fatal(
            f"The first {early_repeats} requests all failed the same way, so the job stopped: "
            + (outcome.error or f"status {outcome.status}")
        )
    if kind is OutcomeKind.BAD_ROW:
        if packed:
            return Requeue(solo=True)
        return DeadLetter(outcome.error or f"rejected ({outcome.status})")
    # RETRY
    error = outcome.error or "transient error"
    if attempts >= retries.max_attempts:
        return DeadLetter(f"gave up after {attempts} attempts: {error}")
    return Retry(backoff_s(attempts, retries, uniform))


def after_invalid_answer(invalid_attempts: int, reason: str, retries: RetrySpec) -> Requeue | DeadLetter:
    """An answer that does not fit the schema was paid for; ask again a few times, then give up."""
    if invalid_attempts < retries.invalid_output_attempts:
        return Requeue()
    return DeadLetter(reason)


def failure_signature(outcome: Outcome) -> tuple[OutcomeKind, int, str | None] | None:
    """What makes two failures 'the same' for the early stop: their class, status and the error
    body's code. Not the message: servers put each row's own figures in it (its token count, say)."""
    # No response at all (a timeout, a reset) says nothing about the request, and an answer the
    # model refused (a 2xx) is about its row: those never stop the job early.
    if outcome.kind in (OutcomeKind.RETRY, OutcomeKind.BAD_ROW) and outcome.status >= 300:
        return outcome.kind, outcome.status, outcome.code
    return None


def _cause(outcome: Outcome) -> StopCause:
    return StopCause.QUOTA if outcome.quota else StopCause.FATAL
