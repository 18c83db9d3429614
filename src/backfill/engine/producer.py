"""The producer: reads the input in chunks, renders each row into its request, answers what it can from the
ledger (the cache, and a rebuilt chunk's dead letters), and queues the rest for the dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from backfill.engine.chunks import Chunk, ChunkBook, RowResult
from backfill.engine.dispatch import Dispatcher, Row
from backfill.engine.plan import Plan
from backfill.errors import BackfillError
from backfill.prompt import RenderBudgetError
from backfill.request import Request
from backfill.store import CachedResponse, DeadLetter, Store


# A template over its render budget on more than half of this many first rows stops the job.
BUDGET_SAMPLE_ROWS = 100


@dataclass(frozen=True)
class Rendered:
    """One row rendered: its request, or the reason it has none (over_budget: the render limit it broke)."""

    request: Request | None = None
    error: str | None = None
    over_budget: str | None = None


class Producer:
    def __init__(
        self,
        plan: Plan,
        store: Store,
        book: ChunkBook,
        dispatcher: Dispatcher,
        *,
        todo: Callable[[int], bool],
        from_cache: Callable[[CachedResponse], RowResult],
        rebuild: set[int],
        use_cache: bool,
        cache_scope: str = "",
    ):
        self.plan, self.store, self.book, self.dispatcher = plan, store, book, dispatcher
        self._todo = todo  # whether chunk i still has to be written
        self._from_cache = from_cache
        self._rebuild = rebuild  # done chunks whose part is missing: their dead letters are in the ledger
        self._use_cache = use_cache
        self._cache_scope = cache_scope
        # Rows of the first BUDGET_SAMPLE_ROWS rendered, and those of them over the render budget.
        self._budget_seen = self._budget_over = 0
        self._budget_limit: str | None = None

    async def run(self) -> None:
        plan, dispatcher = self.plan, self.dispatcher
        # Sources yield batches of exactly `chunk_size` rows (the last may be shorter): one per chunk.
        read = 0
        for index, batch in enumerate(plan.source.batches(plan.spec.chunk_size)):
            read = index + 1
            if dispatcher.stopping:
                return
            if self._todo(index):
                chunk = await self.book.open(index, pa.Table.from_batches([batch]))
                if dispatcher.stopping:
                    self.book.release_unopened()
                    return
                # A template beyond plain substitution renders off the event loop: a slow one (up to its
                # budget per row) must not hold up other jobs or the API.
                if plan.template.substitution_only:
                    rendered = self._render(chunk)
                else:
                    rendered = await asyncio.to_thread(self._render, chunk)
                self._check_budget(chunk, rendered)
                self._fill(chunk, rendered)
                # Yield so a chunk fully answered from the cache cannot starve the loop.
                await asyncio.sleep(0)
                await dispatcher.until_short()
        if read != plan.chunks_total:
            # A chunk that is never read would leave the job waiting for it for ever.
            raise BackfillError(
                f"The input changed while the job ran ({read:,} chunks read, {plan.chunks_total:,} planned); "
                "restore it, or start a new job."
            )
        dispatcher.all_produced()

    def _render(self, chunk: Chunk) -> list[Rendered]:
        """Each row's request, or why it has none; runs in a worker thread, so it touches no shared state."""
        plan = self.plan
        out: list[Rendered] = []
        for row in chunk.table.to_pylist():
            try:
                request = plan.build_request(row)
            except RenderBudgetError as e:
                out.append(Rendered(error=f"template: {e}", over_budget=e.limit))
                continue
            except BackfillError as e:
                out.append(Rendered(error=f"template: {e}"))
                continue
            too_long = plan.too_long(request)
            out.append(Rendered(error=too_long) if too_long is not None else Rendered(request=request))
        return out

    def _check_budget(self, chunk: Chunk, rendered: list[Rendered]) -> None:
        """Stop the job when its template is over budget on more than half of the first rows:
        dead-lettering every row would only take longer to say the same."""
        if self._budget_seen >= BUDGET_SAMPLE_ROWS:
            return  # judged already
        for r in rendered:
            if self._budget_seen >= BUDGET_SAMPLE_ROWS:
                break
            self._budget_seen += 1
            if r.over_budget is not None:
                self._budget_over += 1
                self._budget_limit = self._budget_limit or r.over_budget
        last = chunk.index == self.plan.chunks_total - 1
        if self._budget_over * 2 > (BUDGET_SAMPLE_ROWS if not last else self._budget_seen):
            raise BackfillError(
                f"The template went over its render budget ({self._budget_limit}) on {self._budget_over:,} of the first "
                f"{self._budget_seen:,} rows; simplify the template and submit the job again."
            )

    def _fill(self, chunk: Chunk, rendered: list[Rendered]) -> None:
        plan, book = self.plan, self.book
        requests: list[tuple[int, Request]] = []
        dead_letters: dict[str, DeadLetter] = {}
        if chunk.index in self._rebuild:
            dead_letters = {d.row_id: d for d in self.store.chunk_dead_letters(plan.job_id, chunk.index)}
        for pos, r in enumerate(rendered):
            dead = dead_letters.get(str(chunk.row_ids[pos])) if dead_letters else None
            if dead is not None:
                book.settle(chunk, pos, RowResult(False, error=dead.reason, raw=dead.raw))
                continue
            if r.request is None:
                book.settle(chunk, pos, RowResult(False, error=r.error))
                continue
            requests.append((pos, r.request))
        # Without the cache, answers this job paid for still serve it: a resume never pays twice.
        paid_by = None if self._use_cache else plan.job_id
        cached = self.store.get_responses({r.key for _, r in requests}, scope=self._cache_scope, paid_by=paid_by)
        for pos, request in requests:
            hit = cached.get(request.key)
            if hit is not None:
                self.dispatcher.stats.rows_from_cache += 1
                book.settle(chunk, pos, self._from_cache(hit))
            else:
                self.dispatcher.enqueue(Row(chunk, pos, request))
