"""Prometheus metrics by lane, user and job (requests, tokens, cost, 429s, errors, latency, queue depth),
and the limiter wrapper that counts each request as it is admitted and answered."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from backfill.limits import Bound, LaneLimiter, LimiterStats, Ticket
from backfill.request import RateLimitInfo, Usage

# The *_created series double the output and say nothing a scraper needs.
disable_created_metrics()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """One registry per server, so several servers in one process (tests) do not collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        by = ("lane", "user", "job")
        self.requests = Counter("backfill_requests", "Requests admitted and sent to the provider.", by, registry=r)
        self.rate_limited = Counter("backfill_rate_limited", "Responses that were 429 (rate limited).", by, registry=r)
        self.errors = Counter("backfill_errors", "Requests that did not succeed (retried, dead letter or fatal).", by, registry=r)
        self.tokens = Counter("backfill_tokens", "Tokens used.", (*by, "direction"), registry=r)
        self.cost = Counter("backfill_cost_usd", "Spend in USD.", by, registry=r)
        self.rows = Counter("backfill_rows", "Rows settled, by outcome.", (*by, "outcome"), registry=r)
        self.latency = Histogram(
            "backfill_request_latency_seconds", "From admission to answer.", ("lane", "user"), buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("backfill_queue_depth", "Jobs queued (including those waiting on a quota).", registry=r)
        self.jobs = Gauge("backfill_jobs", "Jobs by status.", ("status",), registry=r)
        self.lane_rpm = Gauge("backfill_lane_rpm_limit", "Requests/min limit in force on a lane.", ("lane",), registry=r)
        self.lane_in_flight = Gauge("backfill_lane_in_flight", "Requests in flight on a lane.", ("lane",), registry=r)
        # Per user totals outlive the per-job series, which are removed when a job's run ends.
        self.user_requests = Counter("backfill_user_requests", "Requests sent, by lane and user.", ("lane", "user"), registry=r)
        self.user_cost = Counter("backfill_user_cost_usd", "Spend in USD, by lane and user.", ("lane", "user"), registry=r)

    def forget_job(self, lane: str, user: str, job_id: str) -> None:
        """Drop a job's label sets once its run ended, so the series do not grow with every job ever run."""
        labels = (lane, user, job_id)
        for family in (self.requests, self.rate_limited, self.errors, self.cost):
            with contextlib.suppress(KeyError):
                family.remove(*labels)
        for direction in ("input", "output"):
            with contextlib.suppress(KeyError):
                self.tokens.remove(*labels, direction)
        for outcome in ("ok", "dead_letter"):
            with contextlib.suppress(KeyError):
                self.rows.remove(*labels, outcome)


@dataclass
class LaneCounters:
    """Per-lane totals the dashboard turns into rates over time."""

    admitted: int = 0
    rate_limited: int = 0


class MeteredLimiter(LaneLimiter):
    """A job's view of its lane that counts what passes through it; the label children are bound once,
    so each request costs a few increments."""

    def __init__(self, inner: LaneLimiter, lane: LaneCounters, metrics: Metrics, lane_key: str, user: str, job_id: str):
        self._inner = inner
        self._lane = lane
        self._requests = metrics.requests.labels(lane_key, user, job_id)
        self._user_requests = metrics.user_requests.labels(lane_key, user)
        self._limited = metrics.rate_limited.labels(lane_key, user, job_id)
        self._errors = metrics.errors.labels(lane_key, user, job_id)
        self._latency = metrics.latency.labels(lane_key, user)

    async def acquire(self, input_tokens: int, output_tokens: int) -> Ticket:
        ticket = await self._inner.acquire(input_tokens, output_tokens)
        self._lane.admitted += 1
        self._requests.inc()
        self._user_requests.inc()
        return ticket

    def release(self, ticket: Ticket, *, usage: Usage | None = None, rate: RateLimitInfo | None = None, success: bool = True) -> None:
        if not ticket.done:
            self._latency.observe(time.monotonic() - ticket.admitted_at)
            if not success:
                self._errors.inc()
        self._inner.release(ticket, usage=usage, rate=rate, success=success)

    def rate_limited(self, ticket: Ticket, *, retry_after: float | None, rate: RateLimitInfo | None) -> None:
        if not ticket.done:
            self._lane.rate_limited += 1
            self._limited.inc()
        self._inner.rate_limited(ticket, retry_after=retry_after, rate=rate)

    def stats(self) -> LimiterStats:
        return self._inner.stats()

    def bound(self) -> Bound | None:
        return self._inner.bound()

    def counts_tokens(self) -> bool:
        return self._inner.counts_tokens()
