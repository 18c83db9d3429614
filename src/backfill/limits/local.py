"""The in-process limiter of one lane: even pacing under requests/min and tokens/min, an in-flight
cap, 429 pauses with AIMD pace, and limits learned from the provider's rate-limit headers."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from backfill.limits.base import Bound, LaneLimiter, LaneLimits, LimiterStats, Ticket
from backfill.limits.bucket import Bucket
from backfill.request import RateLimitInfo, Usage

# Until the first response tells us the lane's limits, only this many requests are in flight.
PROBE_IN_FLIGHT = 4
# AIMD: a 429 multiplies the pace by BACKOFF (not below PACE_FLOOR); successes add RECOVER_PER_S per second.
BACKOFF = 0.8
PACE_FLOOR = 0.25
RECOVER_PER_S = 0.02
DEFAULT_PAUSE_S = 1.0
# A server's bucket, sized from its headers, is followed up to this many seconds of the limit: the
# providers enforce per-minute limits over windows of about a second (OpenAI documents 60,000/min
# as 1,000/s), whatever capacity their headers imply.
MAX_BURST_S = 1.0
# Of the server's bucket we take this share: the rest absorbs requests that reach it bunched
# (connection set-up, network jitter), which would otherwise meet 429s when both buckets are full.
SERVER_BURST_SHARE = 0.9
# Of the server's bucket we leave this share unused in steady state, for requests that reach it
# bunched; less than the slack above, as our own bucket is then nearly empty and cannot burst.
MARGIN_SHARE = 0.05
# The burst learned after the start (the server's bucket was bigger than ours) is taken late, at
# most this share above the limit, while the server's `remaining` shows the room.
LIFT_SHARE = 0.1
MAX_PAUSE_S = 60.0
# Admit up to this early rather than arm a timer for less: the accounting stays exact (the bucket
# goes a hair into debt), and it spares one loop wake-up per request at thousands of requests/s.
EARLY_S = 0.001

_Waiter = tuple[asyncio.Future[Ticket], int, int]


def _in_force(given: float | None, learned: float | None) -> float | None:
    """Given limits win, except that a lower limit reported by the server is respected: the server
    enforces it anyway, and pacing above it would only buy 429s."""
    if given is None:
        return learned
    if learned is None:
        return given
    return min(given, learned)


class Limiter(LaneLimiter):
    """One lane's limiter, in this process. FIFO: one waiter queue woken by one timer set for the
    moment the head's reservation fits, or by a release when it waits for an in-flight slot."""

    def __init__(self, limits: LaneLimits, *, learn: bool = True, clock: Callable[[], float] = time.monotonic):
        self._limits = limits
        self._learn = learn
        self._clock = clock
        now = clock()
        self._learned_rpm: float | None = None
        self._learned_tpm: float | None = None
        self._learned_input_tpm: float | None = None
        self._learned_output_tpm: float | None = None
        self._server_burst_s: dict[str, float] = {}  # per limit: the smallest server capacity seen, in seconds
        self._requests: Bucket | None = None
        self._tokens: Bucket | None = None
        self._input: Bucket | None = None
        self._output: Bucket | None = None
        self._pace = 1.0
        self._pace_stamp = now
        self._last_backoff = -math.inf
        self._paused_until = -math.inf
        self._in_flight = 0
        self._probing = learn and all(v is None for v in (limits.rpm, limits.tpm, limits.input_tpm, limits.output_tpm))
        self._waiters: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._n_rate_limited = 0
        self._apply_limits(now)

    def set_limits(self, limits: LaneLimits) -> None:
        """Change the lane's given limits while it runs (an operator's edit); waiters that now fit go."""
        self._limits = limits
        self._apply_limits(self._clock())
        self._pump()

    # --- the engine's calls -------------------------------------------------------------------

    async def acquire(self, input_tokens: int, output_tokens: int) -> Ticket:
        if not self._waiters:
            now = self._clock()
            if self._wait_s(input_tokens, output_tokens, now) <= EARLY_S:
                return self._admit(input_tokens, output_tokens, now)
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, input_tokens, output_tokens))
        if len(self._waiters) == 1:
            self._pump()
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._give_back(fut.result())  # admitted, but our caller is gone: nothing was sent
            self._pump()
            raise

    def release(
        self,
        ticket: Ticket,
        *,
        usage: Usage | None = None,
        rate: RateLimitInfo | None = None,
        success: bool = True,
    ) -> None:
        if ticket.done:
            return
        ticket.done = True
        self._in_flight -= 1
        now = self._clock()
        if usage is not None and (usage.input_tokens or usage.output_tokens):
            self._correct(ticket, usage, now)
        if rate is not None and self._learn:
            self._learn_limits(rate, now)
            self._learn_bursts(rate, now)
            self._follow_remaining(ticket, rate, now)
        if self._probing and (success or rate is not None):
            self._probing = False
        if success and self._pace < 1.0:
            self._recover(now)
        if self._waiters:
            self._pump()

    def rate_limited(self, ticket: Ticket, *, retry_after: float | None, rate: RateLimitInfo | None) -> None:
        if ticket.done:
            return
        ticket.done = True
        self._in_flight -= 1
        self._n_rate_limited += 1
        now = self._clock()
        if rate is not None and self._learn:
            self._learn_limits(rate, now)
            self._probing = False
        pause = retry_after if retry_after is not None else _pause_from_headers(rate)
        self._paused_until = max(self._paused_until, now + min(max(pause, 0.0), MAX_PAUSE_S))
        # The request was not admitted, so it took nothing; but the server's bucket is empty now,
        # so resume from empty instead of with a burst that would meet another 429.
        for bucket, cost in self._costs(ticket.input_tokens, ticket.output_tokens):
            bucket.refill(now)
            bucket.adjust(cost)
            bucket.drain()
        # Back off once per round: 429s for requests sent before the last backoff are old news.
        if ticket.admitted_at >= self._last_backoff:
            self._last_backoff = now
            self._set_pace(max(PACE_FLOOR, self._pace * BACKOFF), now)
        if self._waiters:
            self._pump()

    def counts_tokens(self) -> bool:
        # Requests admitted while no token limit is known are charged their real usage on release.
        return self._tokens is not None or self._input is not None

    def bound(self) -> Bound | None:
        head = next(((i, o) for fut, i, o in self._waiters if not fut.done()), None)
        if head is None:
            return None
        if self._in_flight >= self._slot_cap():
            return Bound.IN_FLIGHT
        now = self._clock()
        waits = [(self._paused_until - now, Bound.PAUSED)]
        for bound, bucket, cost in (
            (Bound.REQUESTS, self._requests, 1),
            (Bound.TOKENS, self._tokens, head[0] + head[1]),
            (Bound.INPUT_TOKENS, self._input, head[0]),
            (Bound.OUTPUT_TOKENS, self._output, head[1]),
        ):
            if bucket is not None:
                bucket.refill(now)
                waits.append((bucket.wait_s(cost), bound))
        wait, bound = max(waits, key=lambda w: w[0])
        return bound if wait > 0 else None

    def stats(self) -> LimiterStats:
        now = self._clock()
        rpm = self._requests.per_minute if self._requests is not None else None
        learned = self._learn and any(
            v is not None
            for v in (self._learned_rpm, self._learned_tpm, self._learned_input_tpm, self._learned_output_tpm)
        )
        return LimiterStats(
            rpm=rpm,
            tpm=self._tokens.per_minute if self._tokens is not None else None,
            input_tpm=self._input.per_minute if self._input is not None else None,
            output_tpm=self._output.per_minute if self._output is not None else None,
            in_flight=self._in_flight,
            max_in_flight=self._slot_cap(),
            waiting=sum(1 for fut, _, _ in self._waiters if not fut.done()),
            paced_rpm=None if rpm is None else rpm * self._limits.utilization * self._pace,
            pace=self._pace,
            paused_for_s=max(0.0, self._paused_until - now),
            n_rate_limited=self._n_rate_limited,
            learned=learned,
        )

    # --- admission ----------------------------------------------------------------------------

    def _slot_cap(self) -> int:
        cap = self._limits.max_in_flight
        return min(cap, PROBE_IN_FLIGHT) if self._probing else cap

    def _wait_s(self, input_tokens: int, output_tokens: int, now: float) -> float:
        """Seconds until this reservation fits; inf when it waits for an in-flight slot."""
        if self._in_flight >= self._slot_cap():
            return math.inf
        wait = self._paused_until - now
        b = self._requests
        if b is not None:
            b.refill(now)
            w = b.wait_s(1)
            wait = max(wait, w)
        b = self._tokens
        if b is not None:
            b.refill(now)
            w = b.wait_s(input_tokens + output_tokens)
            wait = max(wait, w)
        b = self._input
        if b is not None:
            b.refill(now)
            w = b.wait_s(input_tokens)
            wait = max(wait, w)
        b = self._output
        if b is not None:
            b.refill(now)
            w = b.wait_s(output_tokens)
            wait = max(wait, w)
        return wait

    def _admit(self, input_tokens: int, output_tokens: int, now: float) -> Ticket:
        """Charge the reservation (buckets already refilled to `now` by _wait_s)."""
        self._in_flight += 1
        ticket = Ticket(now, input_tokens, output_tokens)
        b = self._requests
        if b is not None:
            b.charge(1)
            ticket.mark_requests = b.flow
        b = self._tokens
        if b is not None:
            b.charge(input_tokens + output_tokens)
            ticket.mark_tokens = b.flow
        b = self._input
        if b is not None:
            b.charge(input_tokens)
            ticket.mark_input = b.flow
        b = self._output
        if b is not None:
            b.charge(output_tokens)
            ticket.mark_output = b.flow
        return ticket

    def _pump(self) -> None:
        """Admit waiters from the head while they fit; otherwise arm the timer for when the head fits."""
        now = self._clock()
        waiters = self._waiters
        while waiters:
            fut, input_tokens, output_tokens = waiters[0]
            if fut.done():  # cancelled while waiting
                waiters.popleft()
                continue
            wait = self._wait_s(input_tokens, output_tokens, now)
            if wait > EARLY_S:
                if wait != math.inf:
                    self._arm(wait)
                return
            waiters.popleft()
            fut.set_result(self._admit(input_tokens, output_tokens, now))

    def _arm(self, wait: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + wait
        if self._timer is not None:
            if self._timer_at <= at:
                return  # an earlier wake-up is due and will re-arm
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._pump()

    def _give_back(self, ticket: Ticket) -> None:
        """Undo an admission whose request was never sent."""
        ticket.done = True
        self._in_flight -= 1
        now = self._clock()
        for bucket, cost in self._costs(ticket.input_tokens, ticket.output_tokens):
            bucket.refill(now)
            bucket.adjust(cost)

    # --- corrections and learning -------------------------------------------------------------

    def _buckets(self) -> list[Bucket]:
        return [b for b in (self._requests, self._tokens, self._input, self._output) if b is not None]

    def _costs(self, input_tokens: int, output_tokens: int) -> list[tuple[Bucket, int]]:
        pairs = (
            (self._requests, 1),
            (self._tokens, input_tokens + output_tokens),
            (self._input, input_tokens),
            (self._output, output_tokens),
        )
        return [(b, cost) for b, cost in pairs if b is not None]

    def _correct(self, ticket: Ticket, usage: Usage, now: float) -> None:
        """Input tokens are charged as actually counted; output tokens only where the provider
        refunds its max_tokens reservation (OpenAI keeps counting max_tokens)."""
        extra_in = ticket.input_tokens - usage.input_tokens if usage.input_tokens else 0
        extra_out = ticket.output_tokens - usage.output_tokens if self._limits.refund_output else 0
        if extra_in:
            for b in (self._tokens, self._input):
                if b is not None:
                    b.refill(now)
                    b.adjust(extra_in)
        if extra_out:
            for b in (self._tokens, self._output):
                if b is not None:
                    b.refill(now)
                    b.adjust(extra_out)

    def _learn_limits(self, rate: RateLimitInfo, now: float) -> None:
        changed = False
        if rate.limit_requests is not None and rate.limit_requests != self._learned_rpm:
            self._learned_rpm = float(rate.limit_requests)
            changed = True
        if rate.limit_tokens is not None and rate.limit_tokens != self._learned_tpm:
            self._learned_tpm = float(rate.limit_tokens)
            changed = True
        if rate.limit_input_tokens is not None and rate.limit_input_tokens != self._learned_input_tpm:
            self._learned_input_tpm = float(rate.limit_input_tokens)
            changed = True
        if rate.limit_output_tokens is not None and rate.limit_output_tokens != self._learned_output_tpm:
            self._learned_output_tpm = float(rate.limit_output_tokens)
            changed = True
        if changed:
            self._apply_limits(now)

    def _learn_bursts(self, rate: RateLimitInfo, now: float) -> None:
        """Size each bucket like the server's: its capacity is `remaining + reset × limit/60` (the
        smallest seen, as rounding only adds); we take SERVER_BURST_SHARE of it, within MAX_BURST_S.

        A bucket that grows owes the difference, paid over the next seconds (Bucket.grow): raising
        the level at once met 429s in the benchmark, as the server counts requests when they arrive
        and we when we send them, and at start-up (new connections, a busy loop) the two drift
        apart by more than the slack."""
        for name, bucket, limit, remaining, reset in (
            ("requests", self._requests, rate.limit_requests, rate.remaining_requests, rate.reset_requests_s),
            ("tokens", self._tokens, rate.limit_tokens, rate.remaining_tokens, rate.reset_tokens_s),
            ("input", self._input, rate.limit_input_tokens, rate.remaining_input_tokens, rate.reset_input_tokens_s),
            ("output", self._output, rate.limit_output_tokens, rate.remaining_output_tokens, rate.reset_output_tokens_s),
        ):
            if bucket is None or not limit or remaining is None or reset is None:
                continue
            server_s = (remaining + reset * limit / 60.0) / (limit / 60.0)
            seen = self._server_burst_s.get(name)
            if seen is not None and server_s >= seen:
                continue
            self._server_burst_s[name] = server_s
            server_s = min(server_s, MAX_BURST_S)
            burst_s = SERVER_BURST_SHARE * server_s
            if abs(burst_s - bucket.burst_s) <= 0.05 * bucket.burst_s:
                continue
            bucket.grow(burst_s, pace=self._limits.utilization * self._pace, now=now)

    def _follow_remaining(self, ticket: Ticket, rate: RateLimitInfo, now: float) -> None:
        """Pull a bucket down when the server has less left than our own accounting says (another
        client on the same key, or a different count); never up."""
        for bucket, remaining, mark in (
            (self._requests, rate.remaining_requests, ticket.mark_requests),
            (self._tokens, rate.remaining_tokens, ticket.mark_tokens),
            (self._input, rate.remaining_input_tokens, ticket.mark_input),
            (self._output, rate.remaining_output_tokens, ticket.mark_output),
        ):
            if bucket is not None and remaining is not None and mark is not None:
                bucket.refill(now)
                margin = bucket.capacity * MARGIN_SHARE / SERVER_BURST_SHARE
                bucket.follow_server(remaining, mark, margin=margin, lift_share=LIFT_SHARE, now=now)

    def _apply_limits(self, now: float) -> None:
        given = self._limits
        self._requests = self._bucket(self._requests, _in_force(given.rpm, self._learned_rpm), now)
        self._tokens = self._bucket(self._tokens, _in_force(given.tpm, self._learned_tpm), now)
        self._input = self._bucket(self._input, _in_force(given.input_tpm, self._learned_input_tpm), now)
        self._output = self._bucket(self._output, _in_force(given.output_tpm, self._learned_output_tpm), now)

    def _bucket(self, bucket: Bucket | None, per_minute: float | None, now: float) -> Bucket | None:
        if per_minute is None:
            return None
        pace = self._limits.utilization * self._pace
        if bucket is None:
            return Bucket(per_minute, burst_s=self._limits.burst_s, pace=pace, now=now)
        if bucket.per_minute != per_minute:
            bucket.configure(per_minute, burst_s=bucket.burst_s, pace=pace, now=now)
        return bucket

    def _set_pace(self, pace: float, now: float) -> None:
        self._pace = pace
        self._pace_stamp = now
        for b in self._buckets():
            b.configure(b.per_minute, burst_s=b.burst_s, pace=self._limits.utilization * pace, now=now)

    def _recover(self, now: float) -> None:
        # Cap the step so the first success after a long pause does not undo the backoff at once.
        step = min(now - self._pace_stamp, 1.0) * RECOVER_PER_S
        self._set_pace(min(1.0, self._pace + step), now)


def _pause_from_headers(rate: RateLimitInfo | None) -> float:
    """How long to pause when the 429 gave no retry-after: until the exhausted limits reset."""
    if rate is None:
        return DEFAULT_PAUSE_S
    resets = [
        reset
        for remaining, reset in (
            (rate.remaining_requests, rate.reset_requests_s),
            (rate.remaining_tokens, rate.reset_tokens_s),
            (rate.remaining_input_tokens, rate.reset_input_tokens_s),
            (rate.remaining_output_tokens, rate.reset_output_tokens_s),
        )
        if remaining is not None and remaining <= 0 and reset is not None
    ]
    return max(resets) if resets else DEFAULT_PAUSE_S
