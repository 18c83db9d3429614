"""The limiter's contract: what a lane's limits are, the ticket a request holds while in flight, and
the interface every home of a limiter (in-process now, shared across processes later) implements."""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

from backfill.errors import SpecError
from backfill.request import RateLimitInfo, Usage


@dataclass
class LaneLimits:
    """A lane's limits as given by the user; None means unknown (learned from headers when allowed)."""

    rpm: float | None = None  # requests per minute
    tpm: float | None = None  # tokens per minute (OpenAI: prompt + max_tokens at admission)
    input_tpm: float | None = None  # Anthropic input tokens per minute
    output_tpm: float | None = None  # Anthropic output tokens per minute
    max_in_flight: int = 256
    # Anthropic counts max_tokens at admission and corrects to the actual output; OpenAI does not.
    refund_output: bool = False
    # Bucket capacity in seconds of the limit until the provider's headers tell the size of its own
    # (then the limiter follows that). Half a second: at start-up, new connections make requests
    # reach the server bunched, and a start at 0.9 s met 429s against a 1 s server bucket.
    burst_s: float = 0.5
    # Fraction of each limit we pace at, leaving the server's buckets a little headroom for jitter.
    utilization: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "input_tpm", "output_tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SpecError(
                    f"The {name} limit must be a positive number (got {value}); leave it unset to learn it."
                )
        if self.max_in_flight < 1:
            raise SpecError(f"max_in_flight must be at least 1 (got {self.max_in_flight}).")
        if self.burst_s <= 0 or not 0 < self.utilization <= 1:
            raise SpecError("burst_s must be positive and utilization in (0, 1].")


@dataclass(slots=True)
class Ticket:
    """One admitted request's reservation, handed back on release.

    The marks record each bucket's cumulative flow (refill minus spend) right after this request was
    charged, so that a `remaining` header on its response can be compared with what we spent since.
    """

    admitted_at: float
    input_tokens: int
    output_tokens: int
    mark_requests: float | None = None
    mark_tokens: float | None = None
    mark_input: float | None = None
    mark_output: float | None = None
    done: bool = False


class Bound(str, enum.Enum):
    """What holds a job's pace back: the limit a waiting request waits for, or the job's budget
    (which only the engine reports); its value is the name a person reads."""

    REQUESTS = "requests/min"
    TOKENS = "tokens/min"
    INPUT_TOKENS = "input tokens/min"
    OUTPUT_TOKENS = "output tokens/min"
    IN_FLIGHT = "in flight"
    PAUSED = "a 429 pause"
    BUDGET = "budget"

    def __str__(self) -> str:
        return self.value


@dataclass(slots=True)
class LimiterStats:
    """A snapshot for progress displays and metrics."""

    rpm: float | None  # limits in force (given, learned, or the lower of the two)
    tpm: float | None
    input_tpm: float | None
    output_tpm: float | None
    in_flight: int
    max_in_flight: int  # the cap in force (small while probing an unknown lane)
    waiting: int  # acquires queued
    paced_rpm: float | None  # the request rate we actually pace at now
    pace: float  # 1.0 normally; lowered after 429s and climbing back
    paused_for_s: float
    n_rate_limited: int
    learned: bool  # some limit in force came from the provider's headers


class LaneLimiter(abc.ABC):
    """What the engine calls, whatever the limiter's home (in-process or shared across processes)."""

    @abc.abstractmethod
    async def acquire(self, input_tokens: int, output_tokens: int) -> Ticket:
        """Wait for an in-flight slot, the end of any pause, the pace and the token budgets; reserve them."""

    @abc.abstractmethod
    def release(
        self,
        ticket: Ticket,
        *,
        usage: Usage | None = None,
        rate: RateLimitInfo | None = None,
        success: bool = True,
    ) -> None:
        """Free the slot, correct the reservation with the actual usage, follow the rate-limit headers."""

    @abc.abstractmethod
    def rate_limited(self, ticket: Ticket, *, retry_after: float | None, rate: RateLimitInfo | None) -> None:
        """A 429: free the slot, refund the reservation, pause the whole lane and lower the pace."""

    @abc.abstractmethod
    def stats(self) -> LimiterStats:
        """The limits in force and the limiter's state now."""

    def bound(self) -> Bound | None:
        """The limit the first waiting request waits for now; None when no request waits (or this home cannot tell)."""
        return None

    def counts_tokens(self) -> bool:
        """Whether `acquire` needs the prompt's tokens now (a limit on input tokens is in force).
        Counting is a fair part of a request's CPU, so a lane limited by requests alone skips it."""
        return True
