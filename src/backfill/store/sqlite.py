"""SQLite ledger: one file (WAL mode) holding jobs, chunks, dead letters, events and the response cache.

Responses are cached the moment they arrive: writes queued during one event-loop tick
are committed together at the end of that tick, so a crash loses at most what was
still in flight, while thousands of answers a second cost one commit per tick.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    spec TEXT NOT NULL,
    input_fingerprint TEXT NOT NULL,
    rows_total INTEGER,
    chunks_total INTEGER,
    rows_ok INTEGER NOT NULL DEFAULT 0,
    rows_failed INTEGER NOT NULL DEFAULT 0,
    spent_usd REAL NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    requested TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL,
    chunk_index INTEGER NOT NULL,
    rows_ok INTEGER NOT NULL,
    rows_failed INTEGER NOT NULL,
    done REAL NOT NULL,
    PRIMARY KEY (job_id, chunk_index)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    job_id TEXT NOT NULL,
    row_id TEXT NOT NULL,
    chunk_index INTEGER NOT NULL,
    reason TEXT NOT NULL,
    raw TEXT,
    PRIMARY KEY (job_id, row_id)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, at);
CREATE TABLE IF NOT EXISTS cache (
    request_key TEXT PRIMARY KEY,
    text TEXT,
    embedding BLOB,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    created REAL NOT NULL
);
"""


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
    status: str
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

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_failed


# Named, not `*`: columns added by ALTER TABLE come last in an older ledger.
_JOB_COLUMNS = ", ".join(f.name for f in fields(JobRecord))
# Job columns added after the first release, with their defaults (0).
_ADDED_JOB_COLUMNS = ("requests", "rate_limited")


def _pack(vector: list[float] | None) -> bytes | None:
    return None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def _unpack(blob: bytes | None) -> list[float] | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32).tolist()


class Store:
    """The ledger of one state directory. Not shared between threads; many processes may open the same file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_new_columns()
        self._pending: list[tuple[Any, ...]] = []
        self._pending_spend: dict[str, list[float]] = {}
        self._flush_scheduled = False

    def _add_new_columns(self) -> None:
        """A ledger written by an earlier version lacks the columns added since; add them (with their defaults)."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for column in _ADDED_JOB_COLUMNS:
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self.flush()
        self._db.close()

    # --- the response cache -------------------------------------------------

    def put_response(self, job_id: str, request_key: str, response: CachedResponse) -> None:
        """Record an answer (and what the job paid for it); committed at the end of this loop tick."""
        self._pending.append(
            (
                request_key,
                response.text,
                _pack(response.embedding),
                response.input_tokens,
                response.output_tokens,
                response.cached_tokens,
                response.cost_usd,
                time.time(),
            )
        )
        spend = self._pending_spend.setdefault(job_id, [0.0, 0, 0])
        spend[0] += response.cost_usd
        spend[1] += response.input_tokens
        spend[2] += response.output_tokens
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._flush_scheduled = True
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending and not self._pending_spend:
            return
        rows, self._pending = self._pending, []
        spend, self._pending_spend = self._pending_spend, {}
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO cache VALUES (?,?,?,?,?,?,?,?)", rows)
            for job_id, (usd, tin, tout) in spend.items():
                self._db.execute(
                    "UPDATE jobs SET spent_usd = spent_usd + ?, input_tokens = input_tokens + ?,"
                    " output_tokens = output_tokens + ?, updated = ? WHERE id = ?",
                    (usd, tin, tout, time.time(), job_id),
                )

    def get_responses(self, keys: Iterable[str]) -> dict[str, CachedResponse]:
        """The cached answers among `keys`."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, CachedResponse] = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            marks = ",".join("?" * len(part))
            for row in self._db.execute(
                f"SELECT request_key, text, embedding, input_tokens, output_tokens, cached_tokens, cost_usd"
                f" FROM cache WHERE request_key IN ({marks})",
                part,
            ):
                found[row[0]] = CachedResponse(row[1], _unpack(row[2]), row[3], row[4], row[5], row[6])
        return found

    # --- jobs ----------------------------------------------------------------

    def upsert_job(self, job_id: str, *, owner: str, spec: dict[str, Any], input_fingerprint: str) -> JobRecord:
        """Create the job if it is new; an existing job keeps its ledger (that is what resuming means)."""
        now = time.time()
        self._db.execute(
            "INSERT INTO jobs (id, owner, status, spec, input_fingerprint, created, updated)"
            " VALUES (?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET spec = excluded.spec, updated = excluded.updated",
            (job_id, owner, json.dumps(spec), input_fingerprint, now, now),
        )
        job = self.get_job(job_id)
        assert job is not None
        return job

    def set_status(self, job_id: str, status: str, reason: str | None = None) -> None:
        self.flush()
        self._db.execute(
            "UPDATE jobs SET status = ?, reason = ?, requested = NULL, updated = ? WHERE id = ?",
            (status, reason, time.time(), job_id),
        )
        self.add_event(job_id, status, reason or status)

    def set_totals(self, job_id: str, rows_total: int | None, chunks_total: int | None) -> None:
        self._db.execute(
            "UPDATE jobs SET rows_total = ?, chunks_total = ?, updated = ? WHERE id = ?",
            (rows_total, chunks_total, time.time(), job_id),
        )

    def add_request_counts(self, job_id: str, requests: int, rate_limited: int) -> None:
        """Add one run's request and 429 counts to the job's totals."""
        self._db.execute(
            "UPDATE jobs SET requests = requests + ?, rate_limited = rate_limited + ? WHERE id = ?",
            (requests, rate_limited, job_id),
        )

    def request(self, job_id: str, action: str) -> None:
        """Ask the process running the job to stop ('cancel' or 'pause'); it polls for this."""
        self._db.execute("UPDATE jobs SET requested = ?, updated = ? WHERE id = ?", (action, time.time(), job_id))

    def requested(self, job_id: str) -> str | None:
        row = self._db.execute("SELECT requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def find_jobs(self, prefix: str) -> list[JobRecord]:
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id LIKE ? ORDER BY created", (prefix + "%",)).fetchall()
        return [self._job(r) for r in rows]

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
        values = list(row)
        values[4] = json.loads(values[4])
        return JobRecord(*values)

    # --- chunks and dead letters --------------------------------------------

    def done_chunks(self, job_id: str) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT chunk_index FROM chunks WHERE job_id = ?", (job_id,))}

    def mark_chunk_done(self, job_id: str, chunk_index: int, rows_ok: int, dead_letters: list[DeadLetter]) -> None:
        """Record a chunk whose rows are in the sink, with its dead letters, in one transaction."""
        self.flush()
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
                (job_id, chunk_index, rows_ok, len(dead_letters), time.time()),
            )
            self._db.execute(
                "UPDATE jobs SET rows_ok = rows_ok + ?, rows_failed = rows_failed + ?, updated = ? WHERE id = ?",
                (d_ok, d_failed, time.time(), job_id),
            )

    def dead_letters(self, job_id: str, limit: int | None = None) -> list[DeadLetter]:
        sql = "SELECT row_id, chunk_index, reason, raw FROM dead_letters WHERE job_id = ? ORDER BY chunk_index, rowid"
        params: tuple[Any, ...] = (job_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (job_id, limit)
        return [DeadLetter(*r) for r in self._db.execute(sql, params)]

    # --- events --------------------------------------------------------------

    def add_event(self, job_id: str, kind: str, message: str) -> None:
        self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (job_id, time.time(), kind, message))

    def events(self, job_id: str) -> list[tuple[float, str, str]]:
        return list(self._db.execute("SELECT at, kind, message FROM events WHERE job_id = ? ORDER BY at", (job_id,)))

    # --- plumbing ------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")

