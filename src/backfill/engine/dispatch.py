"""The dispatcher: the queue of rows to send, packing embedding rows, the budget gate, the lane's limiter, the send.

It hands every outcome to the runner (`on_outcome`) and knows nothing of what happens next.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from backfill.engine.breaker import CircuitBreaker
from backfill.engine.chunks import Chunk
from backfill.engine.plan import Plan
from backfill.engine.stats import JobStats
from backfill.limits import LaneLimiter
from backfill.providers import Provider
from backfill.request import Outcome, Request

# An embedding request waits up to this long for the producer to queue a full request's worth of
# rows: otherwise, whenever the limiter does not hold the dispatcher back, requests carry only what
# one chunk queued (measured: 356 requests for 200,000 rows where 109 would do, 6% fewer rows/s).
PACK_LINGER_S = 0.05


@dataclass(slots=True, eq=False)
class Row:
    chunk: Chunk
    pos: int
    request: Request
    attempts: int = 0
    invalid_attempts: int = 0
    solo: bool = False  # an embedding row that must be sent alone to find which input is bad
    paid_usd: float = 0.0  # what this run paid for answers to this row (invalid ones included)


@dataclass(slots=True)
class Send:
    """One request on its way: its rows, the limiter's ticket and the cost reserved against the budget."""

    rows: list[Row]
    ticket: Any
    estimate: float = 0.0


class Dispatcher:
    def __init__(
        self,
        plan: Plan,
        provider: Provider,
        limiter: LaneLimiter,
        stats: JobStats,
        *,
        read_ahead: float,
        full_pack: int,
        on_outcome: Callable[[Send, Outcome], None],
        on_too_large: Callable[[Row, str], None],
        on_budget: Callable[[], None],
    ):
        self.plan, self.provider, self.limiter, self.stats = plan, provider, limiter, stats
        self.breaker = CircuitBreaker()
        self.queue: deque[Row] = deque()
        self._ready = asyncio.Event()
        self._short = asyncio.Event()
        self._read_ahead = read_ahead
        self._full_pack = full_pack
        self._on_outcome, self._on_too_large, self._on_budget = on_outcome, on_too_large, on_budget
        self.waiting: dict[str, list[Row]] = {}  # request key → rows waiting on the one request in flight
        self.reserved_usd = 0.0
        self.produced = False  # every chunk has been read: a dispatcher waiting for a full pack need wait no more
        self.stopping = False
        # The limits in force, refreshed by the runner's watcher: building the snapshot per request costs.
        self.lane = limiter.stats()

    # --- the queue ------------------------------------------------------------------------------

    def enqueue(self, row: Row) -> None:
        waiting = self.waiting.get(row.request.key)
        if waiting is not None:
            waiting.append(row)  # an identical request is already on its way: answer both with it
            return
        self.waiting[row.request.key] = []
        self.requeue(row)

    def requeue(self, row: Row) -> None:
        self.queue.append(row)
        self._ready.set()

    def all_produced(self) -> None:
        self.produced = True
        self._ready.set()

    def stop(self) -> None:
        self.stopping = True
        self._ready.set()
        self._short.set()

    async def until_short(self) -> None:
        """Hold the producer while the queue holds what the dispatcher needs next."""
        while len(self.queue) >= self._read_ahead and not self.stopping:
            self._short.clear()
            await self._short.wait()

    async def _next_row(self) -> Row | None:
        while not self.queue:
            if self.stopping:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.stopping:
            return None
        row = self.queue.popleft()
        if len(self.queue) < self._read_ahead:
            self._short.set()
        return row

    # --- the loop -------------------------------------------------------------------------------

    async def run(self, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        plan = self.plan
        embedding = plan.is_embedding
        always_count = embedding or plan.spec.budget.usd is not None  # packing and budgets need token counts
        while True:
            await self.breaker.wait()
            if embedding:
                await self._until_pack_full()
            row = await self._next_row()
            if row is None:
                return
            rows = self._pack(row) if embedding and not row.solo else [row]
            if always_count:
                tokens_in = sum(r.request.prompt_tokens for r in rows)
            elif self.limiter.counts_tokens():
                tokens_in = sum(r.request.pacing_tokens() for r in rows)
            else:
                tokens_in = 0
            tokens_out = sum(r.request.max_output_tokens for r in rows)
            if len(rows) == 1 and tokens_in and (why := self._beyond_lane(tokens_in, tokens_out)):
                self._on_too_large(row, why)
                continue
            estimate = plan.cost(tokens_in, tokens_out)
            if not self._within_budget(estimate):
                self.queue.extendleft(reversed(rows))
                self._on_budget()
                return
            ticket = await self.limiter.acquire(tokens_in, tokens_out)
            if self.stopping:
                self.limiter.release(ticket, success=False)
                self.queue.extendleft(reversed(rows))
                return
            self.reserved_usd += estimate
            self.stats.tokens_reserved += tokens_in + tokens_out
            spawn(self._send(Send(rows, ticket, estimate)))

    async def _send(self, send: Send) -> None:
        self.stats.requests_sent += 1
        try:
            if self.plan.is_embedding:
                outcome = await self.provider.embed([r.request for r in send.rows])
            else:
                outcome = await self.provider.complete(send.rows[0].request)
        except BaseException:
            self.limiter.release(send.ticket, success=False)
            raise
        finally:
            self.reserved_usd -= send.estimate
        self._on_outcome(send, outcome)

    def _beyond_lane(self, tokens_in: int, tokens_out: int) -> str | None:
        """A request larger than a per-minute token limit could never be admitted: waiting for it
        would hold every other row of the lane back."""
        ls = self.lane
        total = tokens_in + tokens_out
        if ls.tpm is not None and total > ls.tpm:
            return f"too large for the lane's limit: {total:,} tokens (prompt and max_tokens) against {ls.tpm:,.0f} tokens/min"
        if ls.input_tpm is not None and tokens_in > ls.input_tpm:
            return f"too large for the lane's limit: {tokens_in:,} prompt tokens against {ls.input_tpm:,.0f} input tokens/min"
        if ls.output_tpm is not None and tokens_out > ls.output_tpm:
            return f"too large for the lane's limit: max_tokens {tokens_out:,} against {ls.output_tpm:,.0f} output tokens/min"
        return None

    async def _until_pack_full(self) -> None:
        """Wait, at most PACK_LINGER_S, until a full embedding request's worth of rows is queued."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PACK_LINGER_S
        while len(self.queue) < self._full_pack and not self.produced and not self.stopping:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), left)
            except TimeoutError:
                return

    def _pack(self, first: Row) -> list[Row]:
        """Take queued embedding rows into one request, within the provider's per-request limits."""
        rows = [first]
        tokens = first.request.prompt_tokens
        limit_n, limit_tokens = self.provider.max_embedding_inputs, self.provider.max_embedding_tokens
        tpm = self.lane.tpm
        if tpm:  # servers bucket about a second of tokens/min: a bigger call would never be admitted
            limit_tokens = min(limit_tokens, int(tpm / 60 * 0.9))
        while self.queue and len(rows) < limit_n:
            nxt = self.queue[0]
            if nxt.solo or tokens + nxt.request.prompt_tokens > limit_tokens:
                break
            rows.append(self.queue.popleft())
            tokens += nxt.request.prompt_tokens
        return rows

    def _within_budget(self, estimate: float) -> bool:
        budget = self.plan.spec.budget.usd
        return budget is None or self.stats.cost_usd + self.reserved_usd + estimate <= budget


def read_ahead(plan: Plan) -> float:
    """Chat rows are rendered ahead only while fewer than max_in_flight are queued: enough to keep every
    slot busy without holding back the first requests. Embedding rows are packed many to a request, so
    they are read ahead as far as open chunks allow."""
    return math.inf if plan.is_embedding else plan.spec.limits.max_in_flight
