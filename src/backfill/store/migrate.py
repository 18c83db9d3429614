"""Numbered schema migrations of the SQLite ledger, each applied once in its own transaction.

A step is recorded in `schema_migrations` in the same transaction that applies it, and
each transaction starts with BEGIN IMMEDIATE (the write lock), so two processes opening
a fresh ledger at once apply every step exactly once: the second waits for the lock,
then sees the step recorded and skips it. A ledger written before migrations existed
has the tables but no `schema_migrations`; step 1 is that schema with CREATE ... IF NOT
EXISTS, so such a ledger adopts it.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from backfill.store.errors import StoreError

Apply = Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered step: statements run in order, inside the step's transaction."""

    version: int
    name: str
    apply: Apply


def _statements(*sql: str) -> Apply:
    # One execute() per statement: executescript() would commit the step's transaction on Python 3.11.
    def apply(db: sqlite3.Connection) -> None:
        for statement in sql:
            db.execute(statement)

    return apply


_INITIAL_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
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
    )""",
    """CREATE TABLE IF NOT EXISTS chunks (
        job_id TEXT NOT NULL,
        chunk_index INTEGER NOT NULL,
        rows_ok INTEGER NOT NULL,
        rows_failed INTEGER NOT NULL,
        done REAL NOT NULL,
        PRIMARY KEY (job_id, chunk_index)
    )""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        job_id TEXT NOT NULL,
        row_id TEXT NOT NULL,
        chunk_index INTEGER NOT NULL,
        reason TEXT NOT NULL,
        raw TEXT,
        PRIMARY KEY (job_id, row_id)
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        job_id TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id, at)",
    """CREATE TABLE IF NOT EXISTS cache (
        request_key TEXT PRIMARY KEY,
        text TEXT,
        embedding BLOB,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        created REAL NOT NULL
    )""",
)

# The first released ledger lacked these job counters; a ledger adopting step 1 gains them.
_LATE_JOB_COUNTERS = ("requests", "rate_limited")


def _initial_schema(db: sqlite3.Connection) -> None:
    _statements(*_INITIAL_SCHEMA)(db)
    have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    for column in _LATE_JOB_COUNTERS:
        if column not in have:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


# SQLite cannot change a primary key in place: the cache is rebuilt with (scope, request_key).
_CACHE_SCOPE = _statements(
    """CREATE TABLE cache_scoped (
        scope TEXT NOT NULL DEFAULT '',
        request_key TEXT NOT NULL,
        job_id TEXT,
        text TEXT,
        embedding BLOB,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (scope, request_key)
    )""",
    "INSERT INTO cache_scoped (scope, request_key, job_id, text, embedding, input_tokens, output_tokens,"
    " cached_tokens, cost_usd, created) SELECT '', request_key, NULL, text, embedding, input_tokens,"
    " output_tokens, cached_tokens, cost_usd, created FROM cache",
    "DROP TABLE cache",
    "ALTER TABLE cache_scoped RENAME TO cache",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _initial_schema),
    Migration(2, "job stop cause", _statements("ALTER TABLE jobs ADD COLUMN stop_cause TEXT")),
    Migration(
        3,
        "job lease",
        _statements("ALTER TABLE jobs ADD COLUMN lease_holder TEXT", "ALTER TABLE jobs ADD COLUMN lease_until REAL"),
    ),
    Migration(4, "answers per job", _statements("ALTER TABLE jobs ADD COLUMN answers INTEGER NOT NULL DEFAULT 0")),
    Migration(5, "cache scope and payer", _CACHE_SCOPE),
    Migration(
        6,
        "structured-output modes",
        _statements(
            "CREATE TABLE structured_modes (endpoint TEXT NOT NULL, model TEXT NOT NULL, mode TEXT NOT NULL,"
            " updated REAL NOT NULL, PRIMARY KEY (endpoint, model))"
        ),
    ),
    Migration(7, "rows answered live", _statements("ALTER TABLE jobs ADD COLUMN rows_answered INTEGER NOT NULL DEFAULT 0")),
)

_RECORD_TABLE = "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied REAL)"


def recorded_version(db: sqlite3.Connection) -> int:
    """The newest step recorded in the ledger; 0 for a fresh ledger or one from before migrations."""
    has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
    if not has_table:
        return 0
    return db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(db: sqlite3.Connection, path: Path, steps: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the steps the ledger lacks, each in its own transaction; return the version it is at.

    `db` must be in autocommit mode (isolation_level=None). Refuses a ledger that a newer
    backfill has migrated past the last step known here.
    """
    known = steps[-1].version if steps else 0
    version = recorded_version(db)
    if version == known:
        return version  # the common case: no write lock taken at open
    if version > known:
        raise StoreError(
            f"The ledger at {path} was written by a newer backfill (schema {version}, this one knows {known}); upgrade backfill."
        )
    for step in steps:
        if step.version > version:
            _apply(db, path, step)
    return known


def _apply(db: sqlite3.Connection, path: Path, step: Migration) -> None:
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_RECORD_TABLE)
            # Another process may have applied this step while we waited for the lock.
            if not db.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (step.version,)).fetchone():
                step.apply(db)
                db.execute(
                    "INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                    (step.version, step.name, time.time()),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise StoreError(
            f"The ledger at {path} could not be upgraded to schema {step.version} ({step.name}: {e}); "
            "check the file and its disk, then run again."
        ) from e
