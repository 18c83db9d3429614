"""Runs one job: wires the producer, the dispatcher and the chunk book under one task group, and acts on
the outcome policy's decisions.

Every task of the job runs under supervision: an unexpected error in any of them stops the
job as `failed` with one sentence (the traceback goes to the `backfill` logger at debug level),
never a hang. The job's lease is held for the whole run, so two processes never run it at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

from backfill import tokens
from backfill.engine.chunks import ChunkBook, RowResult
from backfill.engine.decoder import AnswerDecoder
from backfill.engine.dispatch import Dispatcher, Row, Send, read_ahead
from backfill.engine.plan import UNSET_MAX_TOKENS_RESERVE, Plan
from backfill.engine.policy import DeadLetter, Decision, Fatal, Requeue, Retry, after_invalid_answer, decide, failure_signature
from backfill.engine.producer import Producer
from backfill.engine.stats import JobStats
from backfill.errors import BackfillError, JobBusy
from backfill.io import make_sink
from backfill.limits import LaneLimiter, LaneLimits, Limiter
from backfill.providers import Provider
from backfill.request import Outcome, OutcomeKind
from backfill.status import JobStatus, StopCause
from backfill.store import CachedResponse, JobRecord, Store

log = logging.getLogger("backfill")

# A lease whose heartbeat stopped this long ago can be taken over by another process.
LEASE_TTL_S = 30.0
HEARTBEAT_S = 5.0
ASSEMBLY_LEASE_S = 3600.0


@dataclass
class RunResult:
    job_id: str
    status: JobStatus
    reason: str | None
    stats: JobStats
    output_path: str | None
    cause: StopCause | None = None
    error: BaseException | None = None  # the unexpected error that failed the job, for --debug


@dataclass
class _Stop:
    status: JobStatus
    reason: str
    cause: StopCause
    hard: bool  # cancel what is in flight instead of waiting for it


def lane_limits(spec: Any, provider: Provider) -> LaneLimits:
    lim = spec.limits
    return LaneLimits(
        rpm=lim.rpm, tpm=lim.tpm, input_tpm=lim.input_tpm, output_tpm=lim.output_tpm,
        max_in_flight=lim.max_in_flight, refund_output=provider.refunds_output_tokens,
    )


def lease_holder() -> str:
    """`pid@host/namespace-token`: unique per runner (two runs in one process are two holders), and
    telling where the process lived, so that a dead one's lease can be taken over at once."""
    return f"{os.getpid()}@{socket.gethostname()}/{_pid_namespace()}-{secrets.token_hex(4)}"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _dead_here(holder: str) -> bool:
    """Whether a lease's holder was a process on this host, in this PID namespace, that no longer
    exists (killed, say): its lease need not run out before the job is taken over."""
    pid, _, rest = holder.partition("@")
    host, _, where = rest.partition("/")
    if host != socket.gethostname() or where.partition("-")[0] != str(_pid_namespace()) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobRunner:
    """Run a planned job against a provider, recording everything in the store."""

    def __init__(
        self, plan: Plan, store: Store, provider: Provider, *, limiter: LaneLimiter | None = None, use_cache: bool = True, cache_scope: str = ""
    ):
        self.plan, self.spec, self.store, self.provider = plan, plan.spec, store, provider
        self.limiter = limiter or Limiter(lane_limits(self.spec, provider))
        self.stats = JobStats(job_id=plan.job_id, rows_total=plan.rows_total, budget_usd=self.spec.budget.usd)
        if not plan.is_embedding and not any(k in plan.spec.task.params for k in ("max_tokens", "max_completion_tokens")):
            self.stats.unset_max_tokens_reserve = UNSET_MAX_TOKENS_RESERVE
        self.holder = lease_holder()
        self._use_cache = use_cache
        self._cache_scope = cache_scope
        self._decoder = AnswerDecoder(self.spec.task.schema_, plan.answer_fields)
        parts = store.path.parent / "jobs" / plan.job_id
        self._sink = make_sink(self.spec.output.path or str(parts / "result.parquet"), format=self.spec.output.format, parts_dir=parts, schema=plan.output_schema)
        # Enough open chunks that a few rows backing off cannot starve the dispatcher, few enough
        # that memory does not grow with the input.
        self._open_chunks = max(16, -(-4 * self.spec.limits.max_in_flight // self.spec.chunk_size) + 4)
        self.dispatcher = Dispatcher(
            plan, provider, self.limiter, self.stats, read_ahead=read_ahead(plan),
            full_pack=min(provider.max_embedding_inputs, self._open_chunks * self.spec.chunk_size),
            on_outcome=self._handle, on_too_large=lambda row, why: self._resolve(row, RowResult(False, error=why)),
            on_budget=self._budget_stop,
        )
        self._stop: _Stop | None = None
        self._stopped = asyncio.Event()
        self._book: ChunkBook | None = None  # made when the run starts, from the ledger's done chunks
        self._sends: set[asyncio.Task[None]] = set()
        self._early: dict[tuple[OutcomeKind, int, str | None], int] = {}  # failures before any success, by signature
        self._error: BaseException | None = None
        self._lease_lost = False
        self._mode: str | None = None  # the structured-output mode schema requests go out in

    @property
    def stopping(self) -> bool:
        return self._stop is not None

    @property
    def output_path(self) -> str:
        return str(self._sink.path)

    def stop(self, status: JobStatus, reason: str, *, cause: StopCause, hard: bool = False) -> None:
        """Stop dispatching. Without `hard`, answers in flight are awaited and kept."""
        if self._stop is None or (hard and not self._stop.hard):
            self._stop = _Stop(JobStatus(status), reason, cause, hard)
            self._stopped.set()
            self.dispatcher.stop()
            if hard:
                for t in list(self._sends):
                    t.cancel()

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        plan, store = self.plan, self.store
        job = store.upsert_job(plan.job_id, owner=self.spec.owner, spec=self.spec.model_dump(by_alias=True), input_fingerprint=plan.input_fingerprint)
        holder = store.try_lease(plan.job_id, self.holder, LEASE_TTL_S)
        if holder is not None and _dead_here(holder):
            holder = store.try_lease(plan.job_id, self.holder, LEASE_TTL_S, take_over=holder)
        if holder is not None:
            shown = holder.partition("/")[0]
            raise JobBusy(f"Job {plan.job_id} is already running in process {shown}; wait for it to finish, or pass --wait to wait here.")
        try:
            try:
                await self._run(job)
            except* Exception as group:
                self._error = group.exceptions[0]
            return self._finish()
        except asyncio.CancelledError:
            # The caller gave up on the run (a notebook's interrupt, a timeout around it): record it.
            self.stop(JobStatus.PAUSED, f"interrupted; run `backfill resume {plan.job_id}` to continue", cause=StopCause.INTERRUPT, hard=True)
            self._finish()
            raise
        finally:
            try:
                store.release_lease(plan.job_id, self.holder)
            except Exception as e:  # a ledger that cannot be written has failed the job already
                log.debug("could not release the lease of job %s", plan.job_id, exc_info=e)

    async def _run(self, job: JobRecord) -> None:
        plan, store, s = self.plan, self.store, self.stats
        store.set_totals(plan.job_id, plan.rows_total, plan.chunks_total)
        store.set_status(plan.job_id, JobStatus.RUNNING)
        self._restore_structured_mode()
        done = store.done_chunks(plan.job_id)
        rebuild = set() if self._sink.is_finalized(plan.chunks_total) else {i for i in done if not self._sink.part_path(i).exists()}
        # Rows of chunks rebuilt (their part is gone) are counted again as they settle.
        again_ok, again_failed = store.chunk_rows(plan.job_id, rebuild)
        self._sink.committed(done - rebuild)  # standard output re-emits, in order, what earlier runs committed
        s.cost_usd, s.rows_ok, s.rows_failed = job.spent_usd, job.rows_ok - again_ok, job.rows_failed - again_failed
        s.rows_before, s.requests_before, s.rate_limited_before = s.rows_done, job.requests, job.rate_limited
        s.rows_committed = job.rows_done  # the ledger's count; the book adds each chunk it commits
        s.sample()  # the zero the live rates count from: requests sent before the watcher's first tick count too
        book = self._book = ChunkBook(plan, store, self._sink, s, self._decoder, limit=self._open_chunks, left=plan.chunks_total - len(done) + len(rebuild))
        producer = Producer(plan, store, book, self.dispatcher, todo=lambda i: i not in done or i in rebuild, from_cache=self._from_cache, rebuild=rebuild, use_cache=self._use_cache, cache_scope=self._cache_scope)
        async with asyncio.TaskGroup() as tg:
            workers = [tg.create_task(producer.run()), tg.create_task(self.dispatcher.run(lambda c: self._spawn(tg, c))), tg.create_task(self._watch())]
            await self._until_end(book)
            if self._stop is not None and not self._stop.hard and self._sends:
                await asyncio.wait(list(self._sends), timeout=self.spec.task.timeout_s + 5)
            for t in [*workers, *self._sends]:
                t.cancel()

    def _spawn(self, tg: asyncio.TaskGroup, coro: Coroutine[Any, Any, None]) -> None:
        task = tg.create_task(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _until_end(self, book: ChunkBook) -> None:
        ends = [asyncio.ensure_future(book.all_done.wait()), asyncio.ensure_future(self._stopped.wait())]
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()

    def _finish(self) -> RunResult:
        plan, store = self.plan, self.store
        status, reason, cause = JobStatus.SUCCEEDED, None, None
        book = self._book
        try:
            store.flush()
            if book is not None:
                store.add_request_counts(plan.job_id, *book.counts_not_committed())
                book.mark_counted()
            self._refresh_stats()
            assemble = self._error is None and self._stop is None and book is not None and book.all_done.is_set()
            # Assembling a large output takes a while, and the heartbeat has stopped: hold the lease for it.
            store.heartbeat(plan.job_id, self.holder, ASSEMBLY_LEASE_S if assemble else LEASE_TTL_S, rows_answered=self.stats.rows_done)
            if assemble:
                self._sink.finalize(plan.chunks_total)
        except Exception as e:  # the ledger or the disk failed while closing: the job failed, committed work stays
            self._error = self._error or e
        if self._error is not None:
            status, reason, cause = JobStatus.FAILED, _sentence(self._error), StopCause.FATAL
            log.debug("job %s failed", plan.job_id, exc_info=self._error)
        elif self._stop is not None:
            status, reason, cause = self._stop.status, self._stop.reason, self._stop.cause
        if not self._lease_lost:
            try:
                store.set_status(plan.job_id, status, reason, cause)
            except Exception as e:
                log.debug("could not record the status of job %s", plan.job_id, exc_info=e)
        output = self.output_path if status is JobStatus.SUCCEEDED else None
        return RunResult(plan.job_id, status, reason, self.stats, output, cause, self._error)

    async def _watch(self) -> None:
        """Sample rates for progress, keep the lease, and obey cancel/pause asked through the store by another process."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + HEARTBEAT_S
        while True:
            await asyncio.sleep(0.5)
            self._refresh_stats()
            if loop.time() >= next_beat:
                next_beat = loop.time() + HEARTBEAT_S
                if not self.store.heartbeat(self.plan.job_id, self.holder, LEASE_TTL_S, rows_answered=self.stats.rows_done):
                    self._lease_lost = True
                    self.stop(JobStatus.PAUSED, "another process took over the job's lease", cause=StopCause.SHUTDOWN, hard=True)
            asked = self.store.requested(self.plan.job_id)
            if asked == "cancel":
                self.stop(JobStatus.CANCELLED, "cancelled by request", cause=StopCause.CANCEL, hard=True)
            elif asked == "pause":
                self.stop(JobStatus.PAUSED, "paused by request", cause=StopCause.PAUSE)

    def _refresh_stats(self) -> None:
        """The limiter's figures, for the live line (the last refresh is at the end); no ledger read: it runs every 0.5 s."""
        ls = self.dispatcher.lane = self.limiter.stats()
        self.stats.sample(self.limiter.bound())
        self.stats.in_flight, self.stats.rpm_limit, self.stats.tpm_limit = ls.in_flight, ls.rpm, ls.tpm
        self.stats.input_tpm_limit, self.stats.output_tpm_limit, self.stats.max_in_flight = ls.input_tpm, ls.output_tpm, ls.max_in_flight

    def _restore_structured_mode(self) -> None:
        """Schema requests start in the mode this endpoint and model last worked in, not with a rejection."""
        if self.spec.task.schema_ is None:
            return
        mode = self.store.get_structured_mode(self.plan.mode_key, self.spec.task.model)
        if mode is not None:
            try:
                self.provider.use_structured_mode(mode)
            except ValueError:  # not a mode of this adapter (a newer backfill wrote it): start from the first
                pass
        current = self.provider.structured_mode
        self._mode = None if current is None else str(current.value)

    def _note_structured_mode(self, mode: str) -> None:
        self._mode = mode
        self.store.set_structured_mode(self.plan.mode_key, self.spec.task.model, mode)
        self.store.add_event(self.plan.job_id, "structured_mode", f"the server takes structured output as {mode}")

    def _budget_stop(self) -> None:
        budget = self.spec.budget.usd or 0.0
        self.stats.budget_reached()
        self.stop(
            JobStatus.PAUSED, f"stopped: budget (${self.stats.cost_usd:.4f} of ${budget:.4f} spent); resume with a higher --budget-usd",
            cause=StopCause.BUDGET,
        )

    # --- outcomes ---------------------------------------------------------------------------------

    def _handle(self, send: Send, outcome: Outcome) -> None:
        # Under a token limit, pacing guesses prompt tokens until the tokenizer is loaded; loading it
        # takes half a second of CPU, so it starts once the first requests are out.
        if not tokens.loaded() and self.limiter.counts_tokens():
            tokens.load_in_background()
        rows, kind = send.rows, outcome.kind
        self.dispatcher.breaker.record(kind is OutcomeKind.RETRY)
        if kind is OutcomeKind.RATE_LIMITED:
            self.stats.rate_limited += 1
            self.limiter.rate_limited(send.ticket, retry_after=outcome.retry_after, rate=outcome.rate)
        else:
            self.limiter.release(send.ticket, usage=outcome.usage, rate=outcome.rate, success=kind is OutcomeKind.OK)
        if outcome.structured_mode is not None and outcome.structured_mode != self._mode:
            self._note_structured_mode(outcome.structured_mode)
        if kind is OutcomeKind.OK and self.plan.is_embedding and len(outcome.embeddings or []) != len(rows):
            outcome = replace(outcome, kind=OutcomeKind.RETRY, error="malformed response: wrong number of embeddings")
            kind = outcome.kind
        if kind is OutcomeKind.OK:
            self.stats.requests_ok += 1
            self._accept(rows, outcome)
            return
        self._bill(rows, outcome)  # a failure can still be billed (a refusal with usage)
        signature = failure_signature(outcome)
        repeats = 0
        if signature is not None and self.stats.requests_ok == 0:
            repeats = self._early[signature] = self._early.get(signature, 0) + 1
        for row in rows:
            decision = decide(outcome, attempts=row.attempts + 1, packed=len(rows) > 1, retries=self.spec.retries, early_repeats=repeats)
            if isinstance(decision, Fatal):
                self._fatal(outcome, decision)
                return
            self._act(row, decision)

    def _act(self, row: Row, decision: Decision) -> None:
        """Carry out a decision for one row (Fatal is the caller's: it stops the whole job)."""
        if isinstance(decision, Requeue):
            row.solo = row.solo or decision.solo
            self.dispatcher.requeue(row)
        elif isinstance(decision, Retry):
            row.attempts += 1
            self.stats.retries += 1
            asyncio.get_running_loop().call_later(decision.delay_s, self.dispatcher.requeue, row)
        elif isinstance(decision, DeadLetter):
            self._resolve(row, RowResult(False, error=decision.reason, cost_usd=row.paid_usd))

    def _charge(self, outcome: Outcome) -> float:
        """Count what an answer was billed in this run's figures; returns its cost."""
        u = outcome.usage
        cost = self.plan.cost(u.input_tokens, u.output_tokens, u.cached_tokens)
        self.stats.input_tokens += u.input_tokens
        self.stats.output_tokens += u.output_tokens
        self.stats.cost_usd += cost
        return cost

    def _bill(self, rows: list[Row], outcome: Outcome) -> None:
        """Record an answer the provider billed that is not cached (refused with usage, invalid, malformed)."""
        u = outcome.usage
        if not (u.input_tokens or u.output_tokens):
            return
        cost = self._charge(outcome)
        self.store.add_spend(self.plan.job_id, cost, u.input_tokens, u.output_tokens)
        for r in rows:
            r.paid_usd += cost / len(rows)

    def _accept(self, rows: list[Row], outcome: Outcome) -> None:
        if self.plan.is_embedding:
            self._accept_embeddings(rows, outcome)
            return
        u = outcome.usage
        row = rows[0]
        cost = self._charge(outcome)
        row.paid_usd += cost
        response = CachedResponse(outcome.text, None, u.input_tokens, u.output_tokens, u.cached_tokens, cost)
        decoded = self._decoder.decode(response)
        if not decoded.ok:  # paid, not cached, asked again a few times
            self.store.add_spend(self.plan.job_id, cost, u.input_tokens, u.output_tokens)
            row.invalid_attempts += 1
            decision = after_invalid_answer(row.invalid_attempts, decoded.error or "invalid output", self.spec.retries)
            if isinstance(decision, Requeue):
                self.dispatcher.requeue(row)
            else:
                self._resolve(row, RowResult(False, error=decision.reason, raw=outcome.text, input_tokens=u.input_tokens, output_tokens=u.output_tokens, cost_usd=row.paid_usd))
            return
        self.store.put_response(self.plan.job_id, row.request.key, response, scope=self._cache_scope, replace=not self._use_cache)
        self._resolve(row, RowResult(True, decoded.answer, input_tokens=u.input_tokens, output_tokens=u.output_tokens, cost_usd=row.paid_usd))

    def _accept_embeddings(self, rows: list[Row], outcome: Outcome) -> None:
        vectors = outcome.embeddings or []
        cost = self._charge(outcome)
        # The pack's billed tokens and cost, split by each row's share of its prompt tokens.
        weights = [max(r.request.prompt_tokens, 1) for r in rows]
        total = sum(weights)
        billed = outcome.usage.input_tokens
        for r, vector, w in zip(rows, vectors, weights):
            share = cost * w / total
            response = CachedResponse(None, vector, round(billed * w / total), 0, 0, share)
            self.store.put_response(self.plan.job_id, r.request.key, response, scope=self._cache_scope, replace=not self._use_cache)
            self._resolve(r, RowResult(True, vector, input_tokens=response.input_tokens, cost_usd=r.paid_usd + share))

    def _from_cache(self, response: CachedResponse) -> RowResult:
        decoded = self._decoder.decode(response)
        return RowResult(decoded.ok, decoded.answer, decoded.error, response.text if not decoded.ok else None,
                         response.input_tokens, response.output_tokens, 0.0, cached=True)

    def _fatal(self, outcome: Outcome, decision: Fatal) -> None:
        reason = decision.reason
        env = self.plan.key_env
        if outcome.status in (401, 403) and env:
            reason = f"{reason} Check the key in ${env}."
        self.store.add_event(self.plan.job_id, "fatal", reason)
        self.stop(JobStatus.FAILED, reason, cause=decision.cause, hard=True)

    def _resolve(self, row: Row, result: RowResult) -> None:
        """Settle a row and every row that waited on the same request (those paid nothing)."""
        book = self._book
        assert book is not None  # rows exist only once the run has made its book
        book.settle(row.chunk, row.pos, result)
        for other in self.dispatcher.waiting.pop(row.request.key, ()):
            book.settle(other.chunk, other.pos, replace(result, cost_usd=0.0, cached=True))


def _sentence(error: BaseException) -> str:
    if isinstance(error, BackfillError):
        return str(error)
    text = (str(error).strip().splitlines() or [""])[0][:200]
    what = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return f"backfill stopped on an unexpected error ({what}); run with --debug for the traceback, then resume the job."
