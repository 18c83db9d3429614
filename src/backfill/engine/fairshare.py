"""Fair sharing of one lane between jobs: weighted fair queuing in front of the lane's limiter.

Each job gets a view with the limiter's interface. When several jobs wait, the next
admission goes to the job that has been served least relative to its weight (its
virtual time: admissions ÷ weight), so two equal weights split the lane half and half
and weights 3:1 three quarters to one quarter. A job that was idle does not bank
credit: it re-enters at the virtual time of the last admission (start-time fair
queuing). Runners keep one acquire waiting at a time, so after each admission the
loop yields once to let the job just served queue its next request before choosing.

A job's own limits (its spec's rpm, tpm, in flight) are an `OwnLimit` in front of its view: they can
only slow that job, never the lane or the other jobs on it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field, replace

from backfill.limits import Bound, LaneLimiter, LimiterStats, Ticket
from backfill.request import RateLimitInfo, Usage


@dataclass(eq=False)
class _Share:
    name: str
    weight: float
    vtime: float = 0.0
    waiters: deque[tuple[int, int, asyncio.Future[Ticket]]] = field(default_factory=deque)


class FairShare:
    """One lane's limiter shared by many jobs; `for_job` hands out each job's view."""

    def __init__(self, limiter: LaneLimiter):
        self.limiter = limiter
        self._shares: dict[str, _Share] = {}
        self._granting = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._virtual = 0.0  # the virtual time of the last admission
        self.admitted: dict[str, int] = {}

    def for_job(self, name: str, weight: float = 1.0) -> JobLimiter:
        share = self._shares.get(name)
        if share is None:
            share = self._shares[name] = _Share(name, weight, vtime=self._virtual)
        share.weight = weight
        return JobLimiter(self, share)

    def leave(self, name: str) -> None:
        """Forget a job that left the lane: every admission looks at each share, so a share kept for
        each finished job would make admission slower with every job the lane has seen."""
        share = self._shares.pop(name, None)
        self.admitted.pop(name, None)
        if share is not None:
            for _, _, fut in share.waiters:
                fut.cancel()

    def set_weight(self, name: str, weight: float) -> None:
        if name in self._shares:
            self._shares[name].weight = weight

    def _enqueue(self, share: _Share, input_tokens: int, output_tokens: int) -> asyncio.Future[Ticket]:
        if not share.waiters:
            share.vtime = max(share.vtime, self._virtual)  # no credit banked while idle
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        share.waiters.append((input_tokens, output_tokens, fut))
        self._wakeup.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._grant())
        return fut

    async def _grant(self) -> None:
        """Admit one request at a time through the limiter, always for the most under-served job."""
        while True:
            waiting = [s for s in self._shares.values() if s.waiters]
            if not waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            share = min(waiting, key=lambda s: s.vtime)
            input_tokens, output_tokens, fut = share.waiters[0]
            if fut.done():  # the caller gave up
                share.waiters.popleft()
                continue
            ticket = await self.limiter.acquire(input_tokens, output_tokens)
            share.waiters.popleft()
            if fut.done():
                self.limiter.release(ticket, success=False)
                continue
            self._virtual = share.vtime
            share.vtime += 1 / share.weight
            self.admitted[share.name] = self.admitted.get(share.name, 0) + 1
            fut.set_result(ticket)
            await asyncio.sleep(0)  # the served job's dispatcher queues its next request here

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class JobLimiter(LaneLimiter):
    """A job's view of a shared lane: same interface as the lane's limiter."""

    def __init__(self, fair: FairShare, share: _Share):
        self._fair = fair
        self._share = share

    async def acquire(self, input_tokens: int, output_tokens: int) -> Ticket:
        fut = self._fair._enqueue(self._share, input_tokens, output_tokens)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._fair.limiter.release(fut.result(), success=False)
            fut.cancel()
            raise

    def release(self, ticket: Ticket, *, usage: Usage | None = None, rate: RateLimitInfo | None = None, success: bool = True) -> None:
        self._fair.limiter.release(ticket, usage=usage, rate=rate, success=success)

    def rate_limited(self, ticket: Ticket, *, retry_after: float | None, rate: RateLimitInfo | None) -> None:
        self._fair.limiter.rate_limited(ticket, retry_after=retry_after, rate=rate)

    def stats(self) -> LimiterStats:
        return self._fair.limiter.stats()

    def bound(self) -> Bound | None:
        return self._fair.limiter.bound()

    def counts_tokens(self) -> bool:
        return self._fair.limiter.counts_tokens()


class OwnLimit(LaneLimiter):
    """A job's own limiter in front of its share of the lane: a request takes a slot in both, the job's first,
    so that a job waiting on its own low limit does not hold a place in the lane's queue."""

    def __init__(self, own: LaneLimiter, shared: LaneLimiter):
        self._own = own
        self._shared = shared
        self._own_tickets: dict[int, Ticket] = {}  # by id() of the lane's ticket

    async def acquire(self, input_tokens: int, output_tokens: int) -> Ticket:
        mine = await self._own.acquire(input_tokens, output_tokens)
        try:
            ticket = await self._shared.acquire(input_tokens, output_tokens)
        except BaseException:
            self._own.release(mine, success=False)
            raise
        self._own_tickets[id(ticket)] = mine
        return ticket

    def _settle_own(self, ticket: Ticket, usage: Usage | None, success: bool) -> None:
        mine = self._own_tickets.pop(id(ticket), None)
        if mine is not None:
            self._own.release(mine, usage=usage, success=success)

    def release(self, ticket: Ticket, *, usage: Usage | None = None, rate: RateLimitInfo | None = None, success: bool = True) -> None:
        self._settle_own(ticket, usage, success)
        self._shared.release(ticket, usage=usage, rate=rate, success=success)

    def rate_limited(self, ticket: Ticket, *, retry_after: float | None, rate: RateLimitInfo | None) -> None:
        self._settle_own(ticket, None, False)
        self._shared.rate_limited(ticket, retry_after=retry_after, rate=rate)

    def bound(self) -> Bound | None:
        """The job's own limit when a request waits on it, else what the lane waits for."""
        return self._own.bound() or self._shared.bound()

    def stats(self) -> LimiterStats:
        """The lane's figures, with the job's own limits where they are the lower."""
        lane, own = self._shared.stats(), self._own.stats()
        return replace(
            lane,
            rpm=_lower(lane.rpm, own.rpm), tpm=_lower(lane.tpm, own.tpm),
            max_in_flight=min(lane.max_in_flight, own.max_in_flight),
        )

    def counts_tokens(self) -> bool:
        return self._shared.counts_tokens() or self._own.counts_tokens()


def _lower(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)
