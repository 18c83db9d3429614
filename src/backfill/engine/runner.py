"""Runs one job: rows → chunks → requests → limiter → provider → cache → sink, exactly once.

A producer reads the input in chunks, skips chunks already done, renders rows into
requests and answers what it can from the cache; a dispatcher sends the rest under the
lane's limiter; each outcome is classified (ok, retry, rate limited, dead letter, fatal);
a chunk whose rows are all settled is written to the sink atomically and only then
marked done in the store.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import jsonschema
import pyarrow as pa

from backfill import tokens
from backfill.engine.breaker import CircuitBreaker
from backfill.engine.plan import Plan
from backfill.engine.stats import JobStats
from backfill.errors import BackfillError
from backfill.io import Sink, output_table
from backfill.limits import LaneLimiter, LaneLimits, Limiter
from backfill.providers import Provider
from backfill.request import Outcome, OutcomeKind, Request
from backfill.spec import JobSpec
from backfill.store import CachedResponse, DeadLetter, Store

# Statuses a job ends in when this process stops it without finishing.
PAUSED = "paused"
# An embedding request waits up to this long for the producer to queue a full request's worth of
# rows: otherwise, whenever the limiter does not hold the dispatcher back, requests carry only what
# one chunk queued (measured: 356 requests for 200,000 rows where 109 would do, 6% fewer rows/s).
PACK_LINGER_S = 0.05
# When this many requests in a row are rejected before any succeeds, the request itself is wrong
# (a bad parameter or schema), not the rows: stop instead of dead-lettering the whole table.
REJECTED_BEFORE_STOP = 20


@dataclass(slots=True)
class RowResult:
    ok: bool
    answer: Any = None  # parsed object (schema), text, or embedding vector
    error: str | None = None
    raw: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(slots=True, eq=False)
class Chunk:
    index: int
    table: pa.Table  # the input rows of this chunk
    row_ids: list[Any]
    results: list[RowResult | None]
    pending: int


@dataclass(slots=True, eq=False)
class Row:
    chunk: Chunk
    pos: int
    request: Request
    attempts: int = 0
    invalid_attempts: int = 0
    solo: bool = False  # an embedding row that must be sent alone to find which input is bad


@dataclass
class RunResult:
    job_id: str
    status: str
    reason: str | None
    stats: JobStats
    output_path: str | None


@dataclass
class _Stop:
    status: str  # PAUSED, "cancelled", "failed"
    reason: str
    hard: bool  # cancel what is in flight instead of waiting for it


def lane_limits(spec: JobSpec, provider: Provider) -> LaneLimits:
    lim = spec.limits
    return LaneLimits(
        rpm=lim.rpm,
        tpm=lim.tpm,
        input_tpm=lim.input_tpm,
        output_tpm=lim.output_tpm,
        max_in_flight=lim.max_in_flight,
        refund_output=provider.refunds_output_tokens,
    )


class JobRunner:
    """Run a planned job against a provider, recording everything in the store."""

    def __init__(self, plan: Plan, store: Store, provider: Provider, *, limiter: LaneLimiter | None = None):
        self.plan = plan
        self.spec = plan.spec
        self.store = store
        self.provider = provider
        lim = self.spec.limits
        self.limiter = limiter or Limiter(lane_limits(self.spec, provider))
        self.stats = JobStats(job_id=plan.job_id, rows_total=plan.rows_total)
        self.breaker = CircuitBreaker()
        self._queue: deque[Row] = deque()
        self._queue_ready = asyncio.Event()
        self._queue_short = asyncio.Event()
        # The producer renders chat rows ahead only while fewer than this are queued: enough to keep
        # every in-flight slot busy, and rendering chunks ahead does not hold back the first requests.
        # Embedding rows are packed many to a request, so they are read ahead as far as chunks allow.
        self._read_ahead: float = math.inf if plan.is_embedding else lim.max_in_flight
        self._waiting: dict[str, list[Row]] = {}  # request key → rows waiting on the one request in flight
        self._tasks: set[asyncio.Task[None]] = set()
        # Enough open chunks that a few rows backing off cannot starve the dispatcher, few enough
        # that memory does not grow with the input.
        open_chunks = max(16, -(-4 * lim.max_in_flight // self.spec.chunk_size) + 4)
        self._open_chunks = asyncio.Semaphore(open_chunks)
        # A full embedding request, or as many rows as the open chunks can queue.
        self._full_pack = min(provider.max_embedding_inputs, open_chunks * self.spec.chunk_size)
        self._chunks_left = 0
        self._all_done = asyncio.Event()
        self._produced = False  # every chunk has been read (and queued or answered from the cache)
        self._stop: _Stop | None = None
        self._stopped = asyncio.Event()
        self._reserved_usd = 0.0
        self._rejected_before_any_ok = 0
        self._validator = jsonschema.Draft202012Validator(self.spec.task.schema_) if self.spec.task.schema_ else None
        self._sink = Sink(
            self.spec.output.path or str(self._parts_dir() / "result.parquet"),
            format=self.spec.output.format,
            parts_dir=self._parts_dir(),
            schema=plan.output_schema,
        )

    def _parts_dir(self) -> Any:
        return self.store.path.parent / "jobs" / self.plan.job_id

    # --- control --------------------------------------------------------------

    def stop(self, status: str = PAUSED, reason: str = "interrupted", *, hard: bool = False) -> None:
        """Stop dispatching. Without `hard`, answers in flight are awaited and kept."""
        if self._stop is None or (hard and not self._stop.hard):
            self._stop = _Stop(status, reason, hard)
            self._stopped.set()
            self._queue_ready.set()
            self._queue_short.set()
            if hard:
                for t in list(self._tasks):
                    t.cancel()

    @property
    def output_path(self) -> str:
        return str(self._sink.path)

    # --- the run --------------------------------------------------------------

    async def run(self) -> RunResult:
        plan, store = self.plan, self.store
        job = store.upsert_job(plan.job_id, owner=self.spec.owner, spec=self.spec.model_dump(by_alias=True), input_fingerprint=plan.input_fingerprint)
        store.set_totals(plan.job_id, plan.rows_total, plan.chunks_total)
        store.set_status(plan.job_id, "running")
        self.stats.cost_usd = job.spent_usd
        self.stats.rows_ok, self.stats.rows_failed = job.rows_ok, job.rows_failed
        self.stats.rows_before = job.rows_done
        self.stats.requests_before, self.stats.rate_limited_before = job.requests, job.rate_limited
        done = store.done_chunks(plan.job_id)
        self._chunks_left = plan.chunks_total - len(done)
        if self._chunks_left == 0:
            self._all_done.set()
        workers = [
            asyncio.create_task(self._produce(done)),
            asyncio.create_task(self._dispatch()),
            asyncio.create_task(self._watch()),
        ]
        try:
            ends = [asyncio.create_task(self._all_done.wait()), asyncio.create_task(self._stopped.wait())]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            for end in ends:
                end.cancel()
            if self._stop is not None and not self._stop.hard:
                await self._drain()
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._tasks:
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            store.flush()
        return self._finish()

    def _finish(self) -> RunResult:
        plan, store = self.plan, self.store
        store.add_request_counts(plan.job_id, self.stats.requests_sent, self.stats.rate_limited)
        if self._stop is None and self._all_done.is_set():
            self._sink.finalize(plan.chunks_total)
            store.set_status(plan.job_id, "succeeded")
            status, reason = "succeeded", None
        else:
            assert self._stop is not None
            status, reason = self._stop.status, self._stop.reason
            store.set_status(plan.job_id, status, reason)
        return RunResult(plan.job_id, status, reason, self.stats, self.output_path if status == "succeeded" else None)

    async def _drain(self) -> None:
        """Wait for requests in flight (their answers are kept), then commit what completed."""
        deadline = self.spec.task.timeout_s + 5
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=deadline)

    async def _watch(self) -> None:
        """Sample rates for progress and obey cancel/pause asked through the store by another process."""
        while True:
            await asyncio.sleep(0.5)
            self.stats.sample()
            ls = self.limiter.stats()
            self.stats.in_flight = ls.in_flight
            self.stats.rpm_limit = ls.rpm
            self.stats.tpm_limit = ls.tpm
            asked = self.store.requested(self.plan.job_id)
            if asked == "cancel":
                self.stop("cancelled", "cancelled by request", hard=True)
            elif asked == "pause":
                self.stop(PAUSED, "paused by request")

    # --- producer: input → chunks → requests ----------------------------------

    async def _produce(self, done: set[int]) -> None:
        # Sources yield batches of exactly `chunk_size` rows (the last may be shorter): one per chunk.
        for index, batch in enumerate(self.plan.source.batches(self.spec.chunk_size)):
            if self._stop:
                return
            if index not in done:
                await self._open_chunk(index, pa.Table.from_batches([batch]))
                await self._until_queue_short()
        self._produced = True
        self._queue_ready.set()  # a dispatcher waiting for a full pack need wait no more

    async def _until_queue_short(self) -> None:
        while len(self._queue) >= self._read_ahead and not self._stop:
            self._queue_short.clear()
            await self._queue_short.wait()

    async def _open_chunk(self, index: int, table: pa.Table) -> None:
        await self._open_chunks.acquire()
        if self._stop:
            self._open_chunks.release()
            return
        plan = self.plan
        rows = table.to_pylist()
        first = index * self.spec.chunk_size
        ids = [r[plan.id_column] for r in rows] if plan.id_column else list(range(first, first + len(rows)))
        chunk = Chunk(index, table, ids, [None] * len(rows), len(rows))
        requests: list[tuple[int, Request]] = []
        for pos, row in enumerate(rows):
            try:
                requests.append((pos, plan.build_request(row)))
            except BackfillError as e:
                self._settle(chunk, pos, RowResult(False, error=f"template: {e}"))
        cached = self.store.get_responses({r.key for _, r in requests})
        for pos, request in requests:
            hit = cached.get(request.key)
            if hit is not None:
                self.stats.rows_from_cache += 1
                self._settle(chunk, pos, self._result_from(hit))
            else:
                self._enqueue(Row(chunk, pos, request))
        # Yield so a chunk fully answered from the cache cannot starve the loop.
        await asyncio.sleep(0)

    def _enqueue(self, row: Row) -> None:
        waiting = self._waiting.get(row.request.key)
        if waiting is not None:
            waiting.append(row)  # an identical request is already on its way: answer both with it
            return
        self._waiting[row.request.key] = []
        self._queue.append(row)
        self._queue_ready.set()

    def _requeue(self, row: Row) -> None:
        self._queue.append(row)
        self._queue_ready.set()

    # --- dispatcher: queue → limiter → provider --------------------------------

    async def _next_row(self) -> Row | None:
        while not self._queue:
            if self._stop:
                return None
            self._queue_ready.clear()
            await self._queue_ready.wait()
        if self._stop:
            return None
        row = self._queue.popleft()
        if len(self._queue) < self._read_ahead:
            self._queue_short.set()
        return row

    async def _dispatch(self) -> None:
        embedding = self.plan.is_embedding
        always_count = embedding or self.spec.budget.usd is not None  # packing and budgets need token counts
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
            estimate = self.plan.cost(tokens_in, tokens_out)
            if not self._within_budget(estimate):
                self._queue.extendleft(reversed(rows))
                return
            ticket = await self.limiter.acquire(tokens_in, tokens_out)
            if self._stop:
                self.limiter.release(ticket, success=False)
                self._queue.extendleft(reversed(rows))
                return
            self._reserved_usd += estimate
            task = asyncio.create_task(self._send(rows, ticket, estimate))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _until_pack_full(self) -> None:
        """Wait, at most PACK_LINGER_S, until a full embedding request's worth of rows is queued."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PACK_LINGER_S
        while len(self._queue) < self._full_pack and not self._produced and not self._stop:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._queue_ready.clear()
            try:
                await asyncio.wait_for(self._queue_ready.wait(), left)
            except TimeoutError:
                return

    def _pack(self, first: Row) -> list[Row]:
        """Take queued embedding rows into one request, within the provider's per-request limits."""
        rows = [first]
        tokens = first.request.prompt_tokens
        limit_n, limit_tokens = self.provider.max_embedding_inputs, self.provider.max_embedding_tokens
        tpm = self.limiter.stats().tpm
        if tpm:  # servers bucket about a second of tokens/min: a bigger call would never be admitted
            limit_tokens = min(limit_tokens, int(tpm / 60 * 0.9))
        while self._queue and len(rows) < limit_n:
            nxt = self._queue[0]
            if nxt.solo or tokens + nxt.request.prompt_tokens > limit_tokens:
                break
            rows.append(self._queue.popleft())
            tokens += nxt.request.prompt_tokens
        return rows

    def _within_budget(self, estimate: float) -> bool:
        budget = self.spec.budget.usd
        if budget is None:
            return True
        if self.stats.cost_usd + self._reserved_usd + estimate <= budget:
            return True
        self.stop(PAUSED, f"stopped: budget (${self.stats.cost_usd:.4f} of ${budget:.4f} spent); resume with a higher --budget-usd")
        return False

    async def _send(self, rows: list[Row], ticket: Any, estimate: float) -> None:
        self.stats.requests_sent += 1
        try:
            if self.plan.is_embedding:
                outcome = await self.provider.embed([r.request for r in rows])
            else:
                outcome = await self.provider.complete(rows[0].request)
        except asyncio.CancelledError:
            self.limiter.release(ticket, success=False)
            raise
        finally:
            self._reserved_usd -= estimate
        self._handle(rows, ticket, outcome)

    # --- outcomes ---------------------------------------------------------------

    def _handle(self, rows: list[Row], ticket: Any, outcome: Outcome) -> None:
        # Under a token limit, pacing guesses prompt tokens until the tokenizer is loaded; loading it
        # takes half a second of CPU, so it starts once the first requests are out.
        if not tokens.loaded() and self.limiter.counts_tokens():
            tokens.load_in_background()
        kind = outcome.kind
        self.breaker.record(kind is OutcomeKind.RETRY)
        if kind is OutcomeKind.RATE_LIMITED:
            self.stats.rate_limited += 1
            self.limiter.rate_limited(ticket, retry_after=outcome.retry_after, rate=outcome.rate)
            for r in rows:
                self._requeue(r)
            return
        self.limiter.release(ticket, usage=outcome.usage, rate=outcome.rate, success=kind is OutcomeKind.OK)
        if kind is OutcomeKind.OK:
            self.stats.requests_ok += 1
            self._accept(rows, outcome)
        elif kind is OutcomeKind.RETRY:
            for r in rows:
                self._retry(r, outcome.error or "transient error")
        elif kind is OutcomeKind.BAD_ROW:
            if len(rows) > 1:  # a packed embedding call: send each alone to find the bad input
                for r in rows:
                    r.solo = True
                    self._requeue(r)
            else:
                self._dead(rows[0], outcome.error or f"rejected ({outcome.status})")
                self._rejected_before_any_ok += 1
                if self.stats.requests_ok == 0 and self._rejected_before_any_ok >= REJECTED_BEFORE_STOP:
                    self._fatal(outcome, prefix=f"The first {REJECTED_BEFORE_STOP} requests were all rejected, so the job stopped: ")
        else:
            self._fatal(outcome)

    def _accept(self, rows: list[Row], outcome: Outcome) -> None:
        usage = outcome.usage
        cost = self.plan.cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens)
        self.stats.input_tokens += usage.input_tokens
        self.stats.output_tokens += usage.output_tokens
        self.stats.cost_usd += cost
        if self.plan.is_embedding:
            vectors = outcome.embeddings or []
            if len(vectors) != len(rows):
                for r in rows:
                    self._retry(r, "malformed response: wrong number of embeddings")
                return
            share = 1 / len(rows)
            for r, vector in zip(rows, vectors):
                tin = r.request.prompt_tokens
                response = CachedResponse(None, vector, tin, 0, 0, cost * share)
                self.store.put_response(self.plan.job_id, r.request.key, response)
                self._resolve(r, self._result_from(response))
            return
        row = rows[0]
        response = CachedResponse(outcome.text, None, usage.input_tokens, usage.output_tokens, usage.cached_tokens, cost)
        result = self._result_from(response)
        if not result.ok:
            # The answer does not fit the schema: paid, not cached, asked again a few times.
            row.invalid_attempts += 1
            if row.invalid_attempts < self.spec.retries.invalid_output_attempts:
                self._requeue(row)
            else:
                self._resolve(row, result)
            return
        self.store.put_response(self.plan.job_id, row.request.key, response)
        self._resolve(row, result)

    def _result_from(self, response: CachedResponse) -> RowResult:
        base = dict(input_tokens=response.input_tokens, output_tokens=response.output_tokens, cost_usd=response.cost_usd)
        if response.embedding is not None:
            return RowResult(True, answer=response.embedding, **base)
        if self._validator is None:
            return RowResult(True, answer=response.text, **base)
        try:
            value = json.loads(response.text or "")
        except json.JSONDecodeError:
            return RowResult(False, error="invalid output: not JSON", raw=response.text, **base)
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "output"
            return RowResult(False, error=f"invalid output at {where}: {error.message}", raw=response.text, **base)
        return RowResult(True, answer=value, **base)

    def _retry(self, row: Row, error: str) -> None:
        row.attempts += 1
        self.stats.retries += 1
        retries = self.spec.retries
        if row.attempts >= retries.max_attempts:
            self._dead(row, f"gave up after {row.attempts} attempts: {error}")
            return
        delay = random.uniform(0, min(retries.backoff_max_s, retries.backoff_s * 2 ** (row.attempts - 1)))
        asyncio.get_running_loop().call_later(delay, self._requeue, row)

    def _dead(self, row: Row, reason: str) -> None:
        self._resolve(row, RowResult(False, error=reason))

    def _fatal(self, outcome: Outcome, prefix: str = "") -> None:
        reason = prefix + (outcome.error or f"the provider refused the job ({outcome.status})")
        env = self.spec.task.key_env
        if outcome.status in (401, 403) and env:
            reason = f"{reason} Check the key in ${env}."
        self.store.add_event(self.plan.job_id, "fatal", reason)
        self.stop("failed", reason, hard=True)

    # --- settling rows and committing chunks -----------------------------------

    def _resolve(self, row: Row, result: RowResult) -> None:
        """Settle a row and every row that waited on the same request."""
        self._settle(row.chunk, row.pos, result)
        for other in self._waiting.pop(row.request.key, ()):
            self._settle(other.chunk, other.pos, result)

    def _settle(self, chunk: Chunk, pos: int, result: RowResult) -> None:
        chunk.results[pos] = result
        chunk.pending -= 1
        if result.ok:
            self.stats.rows_ok += 1
        else:
            self.stats.rows_failed += 1
        if chunk.pending == 0:
            self._commit(chunk)

    def _commit(self, chunk: Chunk) -> None:
        self._sink.write_chunk(chunk.index, self._chunk_table(chunk))
        dead = [
            DeadLetter(str(rid), chunk.index, res.error or "failed", res.raw)
            for rid, res in zip(chunk.row_ids, chunk.results)
            if res is not None and not res.ok
        ]
        self.store.mark_chunk_done(self.plan.job_id, chunk.index, len(chunk.row_ids) - len(dead), dead)
        self._open_chunks.release()
        self._chunks_left -= 1
        if self._chunks_left == 0:
            self._all_done.set()

    def _chunk_table(self, chunk: Chunk) -> pa.Table:
        plan = self.plan
        schema = plan.output_schema
        results: list[RowResult] = [r for r in chunk.results if r is not None]
        columns: dict[str, pa.Array] = {plan.id_name: pa.array(chunk.row_ids, type=schema.field(plan.id_name).type)}
        for name in self.spec.output.columns:
            if name != plan.id_column:
                columns[name] = chunk.table.column(name)
        answer_fields = plan.answer_fields
        if self.spec.task.schema_ is not None:
            answers = output_table([r.answer if r.ok else None for r in results], answer_fields)
            for f in answer_fields:
                columns[f.name] = answers.column(f.name)
        else:
            f = answer_fields[0]
            columns[f.name] = pa.array([r.answer if r.ok else None for r in results], type=f.type)
        columns["status"] = pa.array(["ok" if r.ok else "failed" for r in results], type=pa.string())
        columns["error"] = pa.array([r.error for r in results], type=pa.string())
        columns["input_tokens"] = pa.array([r.input_tokens for r in results], type=pa.int64())
        columns["output_tokens"] = pa.array([r.output_tokens for r in results], type=pa.int64())
        columns["cost_usd"] = pa.array([r.cost_usd for r in results], type=pa.float64())
        return pa.table(columns, schema=schema)

