"""The chunk book: the chunks a job has open, their rows' results, and the commit of a complete chunk.

A chunk commits in one order that a crash cannot make pay twice: the answers it holds are
flushed to the ledger's cache, then its part is written to the sink (atomically), then the
chunk is marked done with its dead letters and the request counts so far.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from backfill.engine.decoder import MISFITS, AnswerDecoder
from backfill.engine.plan import Plan
from backfill.engine.stats import JobStats
from backfill.io import Sink
from backfill.store import DeadLetter, Store


@dataclass(slots=True)
class RowResult:
    ok: bool
    answer: Any = None
    error: str | None = None
    raw: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # what this run paid for the row: 0 when answered from the cache
    cached: bool = False  # answered from the cache, or by an identical row's request


@dataclass(slots=True, eq=False)
class Chunk:
    index: int
    table: pa.Table  # the input rows of this chunk
    row_ids: list[Any]
    results: list[RowResult | None]
    pending: int


class ChunkBook:
    """Opens chunks (at most `limit` at once, so memory does not grow with the input), settles rows, commits."""

    def __init__(self, plan: Plan, store: Store, sink: Sink, stats: JobStats, decoder: AnswerDecoder, *, limit: int, left: int):
        self.plan, self.store, self.sink, self.stats, self.decoder = plan, store, sink, stats, decoder
        self._slots = asyncio.Semaphore(limit)
        self.left = left
        self.all_done = asyncio.Event()
        if left == 0:
            self.all_done.set()
        self._requests_counted = 0
        self._rate_limited_counted = 0

    async def open(self, index: int, table: pa.Table) -> Chunk:
        await self._slots.acquire()
        rows = table.num_rows
        plan = self.plan
        if plan.id_column:
            ids = table.column(plan.id_column).to_pylist()
        else:
            first = index * plan.spec.chunk_size
            ids = list(range(first, first + rows))
        return Chunk(index, table, ids, [None] * rows, rows)

    def release_unopened(self) -> None:
        """Give back a slot taken by `open` for a chunk that will not be processed (the job is stopping)."""
        self._slots.release()

    def settle(self, chunk: Chunk, pos: int, result: RowResult) -> None:
        chunk.results[pos] = result
        chunk.pending -= 1
        if result.ok:
            self.stats.rows_ok += 1
        else:
            self.stats.rows_failed += 1
        if chunk.pending == 0:
            self._commit(chunk)

    def _commit(self, chunk: Chunk) -> None:
        self.store.flush()  # the answers first: a kill after the part is written must not pay for them again
        self.sink.write_chunk(chunk.index, self._table(chunk))
        dead = [
            DeadLetter(str(rid), chunk.index, res.error or "failed", res.raw)
            for rid, res in zip(chunk.row_ids, chunk.results)
            if res is not None and not res.ok
        ]
        requests, limited = self.counts_not_committed()
        self.stats.rows_committed += self.store.mark_chunk_done(
            self.plan.job_id, chunk.index, len(chunk.row_ids) - len(dead), dead, requests=requests, rate_limited=limited
        )
        self.mark_counted()
        self.sink.committed([chunk.index])  # standard output emits the rows only once they are committed
        self._slots.release()
        self.left -= 1
        if self.left == 0:
            self.all_done.set()

    def counts_not_committed(self) -> tuple[int, int]:
        """Requests and 429s of this run not yet recorded with a commit."""
        return self.stats.requests_sent - self._requests_counted, self.stats.rate_limited - self._rate_limited_counted

    def mark_counted(self) -> None:
        self._requests_counted, self._rate_limited_counted = self.stats.requests_sent, self.stats.rate_limited

    def _table(self, chunk: Chunk) -> pa.Table:
        results: list[RowResult] = [r for r in chunk.results if r is not None]
        try:
            answers = self.decoder.columns([r.answer if r.ok else None for r in results])
        except MISFITS:
            # A value that does not fit its column (a number beyond int64) is that row's dead letter.
            for r in results:
                why = self.decoder.misfit(r.answer) if r.ok else None
                if why is not None:
                    r.ok, r.error, r.raw = False, why, _raw(r.answer)
                    self.stats.rows_ok -= 1
                    self.stats.rows_failed += 1
            answers = self.decoder.columns([r.answer if r.ok else None for r in results])
        plan = self.plan
        schema = plan.output_schema
        columns: dict[str, Any] = {plan.id_name: pa.array(chunk.row_ids, type=schema.field(plan.id_name).type)}
        for name in plan.spec.output.columns:
            if name != plan.id_column:
                columns[name] = chunk.table.column(name)
        columns.update(answers)
        columns["status"] = pa.array(["ok" if r.ok else "failed" for r in results], type=pa.string())
        columns["error"] = pa.array([r.error for r in results], type=pa.string())
        columns["input_tokens"] = pa.array([r.input_tokens for r in results], type=pa.int64())
        columns["output_tokens"] = pa.array([r.output_tokens for r in results], type=pa.int64())
        columns["cost_usd"] = pa.array([r.cost_usd for r in results], type=pa.float64())
        columns["cached"] = pa.array([r.cached for r in results], type=pa.bool_())
        return pa.table(columns, schema=schema)


def _raw(answer: Any) -> str:
    return json.dumps(answer, default=str)[:2000]
