"""SQLite ledger: one file (WAL mode) holding jobs, chunks, dead letters, events, leases and the response cache.

Responses are cached the moment they arrive: writes queued during one event-loop tick
are committed together at the end of that tick, so a crash loses at most what was
still in flight, while thousands of answers a second cost one commit per tick. A
commit that fails (disk full, read-only file) keeps the queued rows and raises
StoreError, from the tick's flush into `Store.failed` and from there into the next
call that writes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from backfill.errors import BackfillError
from backfill.status import JobStatus, StopCause
from backfill.store.errors import StoreError
from backfill.store.migrate import migrate


@dataclass(slots=True)
class CachedResponse:
    """An answer that arrived once and is never paid for again."""

    text: str | None
    embedding: list[float] | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: float


@dataclass(slots=True)
class DeadLetter:
    row_id: str
    chunk_index: int
    reason: str
    raw: str | None = None


@dataclass(slots=True)
class JobRecord:
    id: str
    owner: str
    status: JobStatus
    reason: str | None
    spec: dict[str, Any]
    input_fingerprint: str
    rows_total: int | None
    chunks_total: int | None
    rows_ok: int
    rows_failed: int
    spent_usd: float
    input_tokens: int
    output_tokens: int
    requests: int  # requests sent, all runs of the job together
    rate_limited: int  # 429s received
    requested: str | None
    created: float
    updated: float
    stop_cause: StopCause | None
    lease_holder: str | None  # e.g. "12345@hostA"; None when no process runs the job
    lease_until: float | None  # epoch seconds; a lease past this may be taken over
    answers: int  # billed answers (cached or not): output_tokens / answers is the mean answer length
    # Rows answered (committed or not), all runs together, as the running process last wrote it with its
    # heartbeat: ahead of rows_ok + rows_failed (committed chunks only) while the job runs.
    rows_answered: int

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_failed


# Named, not `*`: columns added by ALTER TABLE come last in a migrated ledger.
_JOB_COLUMNS = ", ".join(f.name for f in fields(JobRecord))
_CACHE_INSERT = (
    "INSERT OR IGNORE INTO cache (scope, request_key, job_id, text, embedding, input_tokens, output_tokens,"
    " cached_tokens, cost_usd, created) VALUES (?,?,?,?,?,?,?,?,?,?)"
)


@dataclass(slots=True)
class _Spend:
    """What one job paid during one tick, waiting for the tick's commit."""

    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    answers: int = 0


def _pack(vector: list[float] | None) -> bytes | None:
    return None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def _unpack(blob: bytes | None) -> list[float] | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).tolist()


def _use_wal(db: sqlite3.Connection, path: Path, attempts: int = 50) -> None:
    """Switch a ledger to WAL. Processes opening a fresh file at once race for this switch, and SQLite
    answers the loser "database is locked" at once, without its busy timeout: try again briefly."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorname", "") != "SQLITE_BUSY" or attempt == attempts - 1:
                raise StoreError(f"The ledger at {path} could not be opened ({e}); check the file, then run again.") from e
            time.sleep(0.02)


class Store:
    """The ledger of one state directory. Not shared between threads; many processes may open the same file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            _use_wal(self._db, self.path)
            self._db.execute("PRAGMA synchronous=NORMAL")
            migrate(self._db, self.path)
        except BaseException:
            self._db.close()
            raise
        self._pending: list[tuple[Any, ...]] = []
        self._pending_replace: list[tuple[Any, ...]] = []
        self._pending_spend: dict[str, _Spend] = {}
        self._flush_scheduled = False
        # The error of the last failed commit, kept until a commit succeeds; see flush().
        self.failed: StoreError | None = None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()

    # --- the response cache -------------------------------------------------

    def put_response(
        self, job_id: str, request_key: str, response: CachedResponse, *, scope: str = "", replace: bool = False
    ) -> None:
        """Record an answer in `scope`'s cache and what `job_id` paid for it; committed at the end of this loop tick.

        `replace` overwrites an answer another job paid for (a job run without the cache), so that
        the answer this job paid for is its own when it resumes. Raises the last commit's StoreError
        while the ledger cannot be written (the answer stays queued).
        """
        (self._pending_replace if replace else self._pending).append(
            (
                scope,
                request_key,
                job_id,
                response.text,
                _pack(response.embedding),
                response.input_tokens,
                response.output_tokens,
                response.cached_tokens,
                response.cost_usd,
                time.time(),
            )
        )
        self._queue_spend(job_id, response.cost_usd, response.input_tokens, response.output_tokens)

    def add_spend(self, job_id: str, cost_usd: float, input_tokens: int, output_tokens: int) -> None:
        """Count a billed answer that is not cached (invalid, refused, truncated) in the job's spend; same commit as put_response."""
        self._queue_spend(job_id, cost_usd, input_tokens, output_tokens)

    def _queue_spend(self, job_id: str, cost_usd: float, input_tokens: int, output_tokens: int) -> None:
        spend = self._pending_spend.get(job_id)
        if spend is None:
            spend = self._pending_spend[job_id] = _Spend()
        spend.usd += cost_usd
        spend.input_tokens += input_tokens
        spend.output_tokens += output_tokens
        spend.answers += 1
        if self.failed is not None:
            raise self.failed
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self._flush_soon)
                self._flush_scheduled = True
            except RuntimeError:
                self.flush()

    def _flush_soon(self) -> None:
        # Called by the event loop, where a raise would only reach the loop's exception
        # handler: the error waits in self.failed for the next put_response/flush/mark_chunk_done.
        try:
            self.flush()
        except StoreError:
            pass

    def flush(self) -> None:
        """Commit the queued answers and spend in one transaction.

        On failure the queue is kept, `self.failed` is set and StoreError raised; the next
        flush tries again (and clears `self.failed` when it succeeds), so nothing billed is dropped.
        """
        self._flush_scheduled = False
        if not self._pending and not self._pending_replace and not self._pending_spend:
            self.failed = None
            return
        now = time.time()
        try:
            with self._transaction():
                self._db.executemany(_CACHE_INSERT, self._pending)
                if self._pending_replace:
                    self._db.executemany(_CACHE_INSERT.replace("OR IGNORE", "OR REPLACE"), self._pending_replace)
                for job_id, s in self._pending_spend.items():
                    self._db.execute(
                        "UPDATE jobs SET spent_usd = spent_usd + ?, input_tokens = input_tokens + ?,"
                        " output_tokens = output_tokens + ?, answers = answers + ?, updated = ? WHERE id = ?",
                        (s.usd, s.input_tokens, s.output_tokens, s.answers, now, job_id),
                    )
        except StoreError as e:
            self.failed = e
            raise
        # Cleared only after the commit: a failed one keeps every row for the next try.
        self._pending = []
        self._pending_replace = []
        self._pending_spend = {}
        self.failed = None

    def _queued_responses(self, keys: list[str], scope: str, paid_by: str | None) -> dict[str, CachedResponse]:
        """Answers queued for this tick's commit: a lookup in that window must not send (and pay for) them again."""
        queued = self._pending + self._pending_replace
        if not queued:
            return {}
        wanted = set(keys)
        return {
            row[1]: CachedResponse(row[3], _unpack(row[4]), row[5], row[6], row[7], row[8])
            for row in queued
            if row[1] in wanted and row[0] == scope and (paid_by is None or row[2] == paid_by)
        }

    def get_responses(self, keys: Iterable[str], *, scope: str = "", paid_by: str | None = None) -> dict[str, CachedResponse]:
        """The answers cached in `scope` among `keys`; with `paid_by`, only those that job paid for."""
        keys = list(dict.fromkeys(keys))
        found = self._queued_responses(keys, scope, paid_by)
        only_job = "" if paid_by is None else " AND job_id = ?"
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            marks = ",".join("?" * len(part))
            for row in self._db.execute(
                f"SELECT request_key, text, embedding, input_tokens, output_tokens, cached_tokens, cost_usd"
                f" FROM cache WHERE scope = ? AND request_key IN ({marks}){only_job}",
                [scope, *part] if paid_by is None else [scope, *part, paid_by],
            ):
                found[row[0]] = CachedResponse(row[1], _unpack(row[2]), row[3], row[4], row[5], row[6])
        return found

    def clear_cache(self, *, older_than_s: float | None = None, job_id: str | None = None, scope: str | None = None) -> int:
        """Delete the cached answers matching every filter given (all of them when none is) and return how many."""
        self.flush()
        where: list[str] = []
        params: list[Any] = []
        if older_than_s is not None:
            where.append("created < ?")
            params.append(time.time() - older_than_s)
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        if scope is not None:
            where.append("scope = ?")
            params.append(scope)
        sql = "DELETE FROM cache" + (" WHERE " + " AND ".join(where) if where else "")
        return self._write(sql, params).rowcount

    # --- structured-output modes ----------------------------------------------

    def get_structured_mode(self, endpoint: str, model: str) -> str | None:
        """The structured-output mode learned for this endpoint and model, if any."""
        row = self._db.execute(
            "SELECT mode FROM structured_modes WHERE endpoint = ? AND model = ?", (endpoint, model)
        ).fetchone()
        return row[0] if row else None

    def set_structured_mode(self, endpoint: str, model: str, mode: str) -> None:
        self._write(
            "INSERT INTO structured_modes (endpoint, model, mode, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(endpoint, model) DO UPDATE SET mode = excluded.mode, updated = excluded.updated",
            (endpoint, model, mode, time.time()),
        )

    # --- jobs ----------------------------------------------------------------

    def upsert_job(self, job_id: str, *, owner: str, spec: dict[str, Any], input_fingerprint: str) -> JobRecord:
        """Create the job if it is new; an existing job keeps its ledger (that is what resuming means)."""
        now = time.time()
        self._write(
            "INSERT INTO jobs (id, owner, status, spec, input_fingerprint, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET spec = excluded.spec, updated = excluded.updated",
            (job_id, owner, JobStatus.QUEUED.value, json.dumps(spec), input_fingerprint, now, now),
        )
        job = self.get_job(job_id)
        assert job is not None
        return job

    def set_status(
        self, job_id: str, status: JobStatus | str, reason: str | None = None, cause: StopCause | None = None
    ) -> None:
        """Record the job's status and, when it stopped, why (cause NULL when not given).

        The status is written even when queued answers cannot be (so a job failed by a full
        disk can say so); their error stays in `self.failed`.
        """
        status = JobStatus(status)
        try:
            self.flush()
        except StoreError:
            pass
        self._write(
            "UPDATE jobs SET status = ?, reason = ?, stop_cause = ?, requested = NULL, updated = ? WHERE id = ?",
            (status.value, reason, None if cause is None else StopCause(cause).value, time.time(), job_id),
        )
        self.add_event(job_id, status.value, reason or status.value)

    def set_totals(self, job_id: str, rows_total: int | None, chunks_total: int | None) -> None:
        self._write(
            "UPDATE jobs SET rows_total = ?, chunks_total = ?, updated = ? WHERE id = ?",
            (rows_total, chunks_total, time.time(), job_id),
        )

    def add_request_counts(self, job_id: str, requests: int, rate_limited: int) -> None:
        """Add one run's request and 429 counts to the job's totals."""
        self._write(
            "UPDATE jobs SET requests = requests + ?, rate_limited = rate_limited + ? WHERE id = ?",
            (requests, rate_limited, job_id),
        )

    def request(self, job_id: str, action: str) -> None:
        """Ask the process running the job to stop ('cancel' or 'pause'); it polls for this."""
        self._write("UPDATE jobs SET requested = ?, updated = ? WHERE id = ?", (action, time.time(), job_id))

    def requested(self, job_id: str) -> str | None:
        row = self._db.execute("SELECT requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def find_jobs(self, prefix: str) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id LIKE ? ORDER BY created", (prefix + "%",)).fetchall()
        return [self._job(r) for r in rows]

    def find_job(self, prefix: str) -> JobRecord:
        """The one job whose id starts with `prefix`, or a BackfillError saying why there is none."""
        found = self.find_jobs(prefix)
        if not found:
            raise BackfillError(f"No job {prefix} in this state directory; `backfill jobs` lists them.")
        if len(found) > 1:
            raise BackfillError(f"Job id {prefix} is ambiguous ({len(found)} jobs); give more characters.")
        return found[0]

    def list_jobs(self, owner: str | None = None, limit: int = 50) -> list[JobRecord]:
        if owner is None:
            rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        else:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = ? ORDER BY created DESC LIMIT ?", (owner, limit)
            )
        return [self._job(r) for r in rows.fetchall()]

    @staticmethod
    def _job(row: tuple[Any, ...]) -> JobRecord:
        job = JobRecord(*row)
        job.spec = json.loads(row[4])
        job.status = JobStatus(job.status)
        job.stop_cause = None if job.stop_cause is None else StopCause(job.stop_cause)
        return job

    # --- the job lease (one runner per job) -------------------------------------

    def try_lease(self, job_id: str, holder: str, ttl_s: float = 30.0, *, take_over: str | None = None) -> str | None:
        """Take the job's lease for `ttl_s` if it is free, expired, already ours or held by `take_over`
        (a holder known to be dead): None when taken, else who holds it."""
        now = time.time()
        with self._transaction():
            taken = self._db.execute(
                "UPDATE jobs SET lease_holder = ?, lease_until = ? WHERE id = ?"
                " AND (lease_holder IS NULL OR lease_holder = ? OR lease_holder = ? OR lease_until IS NULL OR lease_until < ?)",
                (holder, now + ttl_s, job_id, holder, take_over, now),
            ).rowcount
            row = None if taken else self._db.execute("SELECT lease_holder FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if taken:
            return None
        if row is None:
            raise StoreError(f"There is no job {job_id} in the ledger at {self.path}; create it before leasing it.")
        return row[0]

    def heartbeat(self, job_id: str, holder: str, ttl_s: float = 30.0, *, rows_answered: int | None = None) -> bool:
        """Extend our lease by `ttl_s` from now, and record the rows answered so far when given; False when the
        lease is no longer ours (another process took it over)."""
        cursor = self._write(
            "UPDATE jobs SET lease_until = ?, rows_answered = COALESCE(?, rows_answered) WHERE id = ? AND lease_holder = ?",
            (time.time() + ttl_s, rows_answered, job_id, holder),
        )
        return cursor.rowcount == 1

    def release_lease(self, job_id: str, holder: str) -> None:
        """Give the lease up, if it is still ours."""
        self._write(
            "UPDATE jobs SET lease_holder = NULL, lease_until = NULL WHERE id = ? AND lease_holder = ?", (job_id, holder)
        )

    # --- chunks and dead letters --------------------------------------------

    def done_chunks(self, job_id: str) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT chunk_index FROM chunks WHERE job_id = ?", (job_id,))}

    def mark_chunk_done(
        self,
        job_id: str,
        chunk_index: int,
        rows_ok: int,
        dead_letters: list[DeadLetter],
        *,
        requests: int = 0,
        rate_limited: int = 0,
    ) -> int:
        """Record a chunk whose rows are in the sink, with its dead letters and the request counts since the last one, in one transaction;
        returns the rows this adds to the job's done rows (a chunk done again adds only the difference)."""
        self.flush()
        now = time.time()
        with self._transaction():
            prev = self._db.execute(
                "SELECT rows_ok, rows_failed FROM chunks WHERE job_id = ? AND chunk_index = ?", (job_id, chunk_index)
            ).fetchone()
            d_ok, d_failed = (rows_ok, len(dead_letters)) if prev is None else (rows_ok - prev[0], len(dead_letters) - prev[1])
            self._db.execute("DELETE FROM dead_letters WHERE job_id = ? AND chunk_index = ?", (job_id, chunk_index))
            self._db.executemany(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?)",
                [(job_id, d.row_id, d.chunk_index, d.reason, d.raw) for d in dead_letters],
            )
            self._db.execute(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                (job_id, chunk_index, rows_ok, len(dead_letters), now),
            )
            self._db.execute(
                "UPDATE jobs SET rows_ok = rows_ok + ?, rows_failed = rows_failed + ?, requests = requests + ?,"
                " rate_limited = rate_limited + ?, updated = ? WHERE id = ?",
                (d_ok, d_failed, requests, rate_limited, now, job_id),
            )
        return d_ok + d_failed

    def chunk_rows(self, job_id: str, chunk_indexes: Iterable[int]) -> tuple[int, int]:
        """Rows ok and failed that the ledger counts for these done chunks."""
        wanted = set(chunk_indexes)
        if not wanted:
            return 0, 0
        ok = failed = 0
        for index, rows_ok, rows_failed in self._db.execute(
            "SELECT chunk_index, rows_ok, rows_failed FROM chunks WHERE job_id = ?", (job_id,)
        ):
            if index in wanted:
                ok, failed = ok + rows_ok, failed + rows_failed
        return ok, failed

    def chunk_dead_letters(self, job_id: str, chunk_index: int) -> list[DeadLetter]:
        """One chunk's dead letters (a rebuilt chunk's rows that failed keep their reasons)."""
        return [
            DeadLetter(*r)
            for r in self._db.execute(
                "SELECT row_id, chunk_index, reason, raw FROM dead_letters WHERE job_id = ? AND chunk_index = ?",
                (job_id, chunk_index),
            )
        ]

    def dead_letters(self, job_id: str, limit: int | None = None) -> list[DeadLetter]:
        sql = "SELECT row_id, chunk_index, reason, raw FROM dead_letters WHERE job_id = ? ORDER BY chunk_index, rowid"
        params: tuple[Any, ...] = (job_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (job_id, limit)
        return [DeadLetter(*r) for r in self._db.execute(sql, params)]

    # --- events --------------------------------------------------------------

    def add_event(self, job_id: str, kind: str, message: str) -> None:
        self._write("INSERT INTO events VALUES (?, ?, ?, ?)", (job_id, time.time(), kind, message))

    def events(self, job_id: str) -> list[tuple[float, str, str]]:
        return list(self._db.execute("SELECT at, kind, message FROM events WHERE job_id = ? ORDER BY at", (job_id,)))

    # --- plumbing ------------------------------------------------------------

    def _write_error(self, e: sqlite3.Error) -> StoreError:
        if getattr(e, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            return StoreError(
                f"The ledger at {self.path} stayed locked by another process ({e}); let it finish, then resume."
            )
        return StoreError(
            f"The ledger at {self.path} could not be written ({e}); free disk space or check the file, then resume."
        )

    def _write(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        """One statement in its own (autocommit) transaction, its failure said as StoreError."""
        try:
            return self._db.execute(sql, tuple(params))
        except sqlite3.Error as e:
            raise self._write_error(e) from e

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error; sqlite's errors come out as StoreError."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # SQLITE_FULL and friends may already have rolled the transaction back.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._write_error(e) from e
