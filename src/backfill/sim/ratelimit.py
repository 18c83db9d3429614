"""Per-key, per-model rate limits as the providers apply them, and the headers that report them.

Each per-minute limit is a continuously refilling token bucket: it refills at `limit / 60` per
second and holds at most `capacity = limit × burst_s / 60` (burst_s defaults to 1 s, so a limit of
600 requests/min admits a burst of 10, then one every 100 ms — the way OpenAI documents enforcing
per-minute limits over short windows). Buckets start full. A request is admitted when every bucket
it draws on holds its cost (or, for a cost larger than the capacity, when the bucket is full; the
bucket then goes into debt, so the long-run rate still never exceeds the limit). So over any window
of W seconds the admitted amount is at most `capacity + limit × W / 60` (plus one oversized request).
A refused request takes nothing. A request costing more than the per-minute limit itself can never
be admitted and is refused as "too large", without retry-after.

OpenAI charges requests (1) and tokens (prompt tokens + max_tokens, not refunded). Anthropic charges
requests, input tokens, and output tokens reserved at max_tokens and corrected to the actual output
when the answer is sent.

Headers: the limit headers carry the per-minute limits, remaining is what could be admitted right
now (the bucket level), reset is the time until the bucket is full again — as a Go-style duration
(`1s`, `6m0s`, `120ms`) for OpenAI and as an RFC 3339 instant for Anthropic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from backfill.sim.config import KeyLimits


class Bucket:
    __slots__ = ("limit", "rate", "capacity", "level", "stamp")

    def __init__(self, limit_per_min: float, burst_s: float, now: float) -> None:
        self.limit = limit_per_min
        self.rate = limit_per_min / 60.0
        self.capacity = limit_per_min * burst_s / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` would be admitted (0 = now); call after refill."""
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def remaining(self) -> int:
        if self.capacity < 1 <= self.limit and self.level >= self.capacity:
            return 1  # a bucket smaller than one unit (e.g. 5 requests/min) admits one when full
        return max(0, int(self.level))

    def reset_s(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted: which limit, and how long until it would be."""

    limit_name: str  # "requests", "tokens", "input_tokens", "output_tokens"
    limit: float
    requested: float
    retry_after_s: float | None  # None: the request exceeds the per-minute limit itself


def _bucket(limit: float | None, burst_s: float, now: float) -> Bucket | None:
    return None if limit is None else Bucket(limit, burst_s, now)


class Lane:
    """The buckets of one (key, model)."""

    __slots__ = ("requests", "tokens", "input_tokens", "output_tokens")

    def __init__(self, limits: KeyLimits, burst_s: float, now: float) -> None:
        self.requests = _bucket(limits.rpm, burst_s, now)
        self.tokens = _bucket(limits.tpm, burst_s, now)
        self.input_tokens = _bucket(limits.input_tpm, burst_s, now)
        self.output_tokens = _bucket(limits.output_tpm, burst_s, now)

    def admit_openai(self, tokens: int, now: float) -> Refusal | None:
        return _admit(((self.requests, "requests", 1), (self.tokens, "tokens", tokens)), now)

    def admit_anthropic(self, input_tokens: int, max_tokens: int, now: float) -> Refusal | None:
        return _admit(
            (
                (self.requests, "requests", 1),
                (self.input_tokens, "input_tokens", input_tokens),
                (self.output_tokens, "output_tokens", max_tokens),
            ),
            now,
        )

    def correct_output(self, reserved: int, actual: int, now: float) -> None:
        """Anthropic: hand back the part of the max_tokens reservation the answer did not use."""
        if self.output_tokens is not None and reserved > actual:
            self.output_tokens.refill(now)
            self.output_tokens.give_back(reserved - actual)

    def openai_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                bucket.refill(now)
                headers[f"x-ratelimit-limit-{name}"] = str(int(bucket.limit))
                headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining())
                headers[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_s())
        return headers

    def anthropic_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        wall = time.time()
        for name, bucket in (
            ("requests", self.requests),
            ("input-tokens", self.input_tokens),
            ("output-tokens", self.output_tokens),
        ):
            if bucket is not None:
                bucket.refill(now)
                headers[f"anthropic-ratelimit-{name}-limit"] = str(int(bucket.limit))
                headers[f"anthropic-ratelimit-{name}-remaining"] = str(bucket.remaining())
                headers[f"anthropic-ratelimit-{name}-reset"] = format_instant(wall + bucket.reset_s())
        return headers


def _admit(charges: tuple[tuple[Bucket | None, str, int], ...], now: float) -> Refusal | None:
    worst: Refusal | None = None
    for bucket, name, cost in charges:
        if bucket is None:
            continue
        if cost > bucket.limit:
            return Refusal(name, bucket.limit, cost, None)
        bucket.refill(now)
        wait = bucket.wait_s(cost)
        if wait > 0 and (worst is None or (worst.retry_after_s or 0.0) < wait):
            worst = Refusal(name, bucket.limit, cost, wait)
    if worst is not None:
        return worst
    for bucket, _, cost in charges:
        if bucket is not None:
            bucket.level -= cost
    return None


def format_duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations): `0s`, `120ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(seconds, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes >= 1:
        hours, minutes = divmod(int(minutes), 60)
        text = f"{minutes}m{text}"
        if hours:
            text = f"{hours}h{text}"
    return text


def format_instant(epoch_s: float) -> str:
    """RFC 3339 in UTC at whole seconds, rounded up (Anthropic's reset headers)."""
    return datetime.fromtimestamp(math.ceil(epoch_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
