"""The producer: reads the input in chunks, renders each row into its request, answers what it can from the
ledger (the cache, and a rebuilt chunk's dead letters), and queues the rest for the dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pyarrow as pa

from backfill.engine.chunks import Chunk, ChunkBook, RowResult
from backfill.engine.dispatch import Dispatcher, Row
from backfill.engine.plan import Plan
from backfill.errors import BackfillError
from backfill.request import Request
from backfill.store import CachedResponse, DeadLetter, Store


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
    ):
        self.plan, self.store, self.book, self.dispatcher = plan, store, book, dispatcher
        self._todo = todo  # whether chunk i still has to be written
        self._from_cache = from_cache
        self._rebuild = rebuild  # done chunks whose part is missing: their dead letters are in the ledger
        self._use_cache = use_cache

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
                self._fill(chunk)
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

    def _fill(self, chunk: Chunk) -> None:
        plan, book = self.plan, self.book
        requests: list[tuple[int, Request]] = []
        dead_letters: dict[str, DeadLetter] = {}
        if chunk.index in self._rebuild:
            dead_letters = {d.row_id: d for d in self.store.chunk_dead_letters(plan.job_id, chunk.index)}
        for pos, row in enumerate(chunk.table.to_pylist()):
            dead = dead_letters.get(str(chunk.row_ids[pos])) if dead_letters else None
            if dead is not None:
                book.settle(chunk, pos, RowResult(False, error=dead.reason, raw=dead.raw))
                continue
            try:
                request = plan.build_request(row)
            except BackfillError as e:
                book.settle(chunk, pos, RowResult(False, error=f"template: {e}"))
                continue
            too_long = plan.too_long(request)
            if too_long is not None:
                book.settle(chunk, pos, RowResult(False, error=too_long))
                continue
            requests.append((pos, request))
        # Without the cache, answers this job paid for still serve it: a resume never pays twice.
        paid_by = None if self._use_cache else plan.job_id
        cached = self.store.get_responses({r.key for _, r in requests}, paid_by=paid_by)
        for pos, request in requests:
            hit = cached.get(request.key)
            if hit is not None:
                self.dispatcher.stats.rows_from_cache += 1
                book.settle(chunk, pos, self._from_cache(hit))
            else:
                self.dispatcher.enqueue(Row(chunk, pos, request))
