"""The server's own tables (users, credentials, uploads, jobs as submitted, spend per day, lanes, webhook
deliveries) in one SQLite file under the data directory, next to the engine's ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    weight REAL NOT NULL DEFAULT 1,
    max_jobs INTEGER,
    usd_per_day REAL,
    usd_per_month REAL,
    webhook_url TEXT,
    webhook_secret TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    base_url TEXT,
    api_key TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    credential TEXT,
    priority REAL NOT NULL,
    webhook_url TEXT,
    spec TEXT NOT NULL,
    rows_total INTEGER NOT NULL,
    output_path TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created);
CREATE TABLE IF NOT EXISTS spend (
    owner TEXT NOT NULL,
    day TEXT NOT NULL,
    usd REAL NOT NULL,
    PRIMARY KEY (owner, day)
);
CREATE TABLE IF NOT EXISTS lanes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    rpm REAL,
    tpm REAL,
    max_in_flight INTEGER
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
"""

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(slots=True)
class User:
    name: str
    role: str
    token_hash: str
    weight: float
    max_jobs: int | None
    usd_per_day: float | None
    usd_per_month: float | None
    webhook_url: str | None
    webhook_secret: str
    created: float

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


@dataclass(slots=True)
class Credential:
    name: str
    provider: str
    base_url: str | None
    api_key: str | None
    created: float


@dataclass(slots=True)
class Upload:
    id: str
    owner: str
    filename: str
    path: str
    size: int
    created: float


@dataclass(slots=True)
class ServerJob:
    id: str
    owner: str
    credential: str | None
    priority: float
    webhook_url: str | None
    spec: dict[str, Any]
    rows_total: int
    output_path: str
    status: str
    reason: str | None
    created: float
    updated: float


@dataclass(slots=True)
class LaneRow:
    id: str
    name: str
    rpm: float | None
    tpm: float | None
    max_in_flight: int | None


@dataclass(slots=True)
class Delivery:
    id: int
    job_id: str
    owner: str
    url: str
    event: str
    body: str
    attempts: int
    next_at: float
    done: int
    last_error: str | None


def today(now: float | None = None) -> str:
    """The UTC day that spend quotas count in."""
    return datetime.fromtimestamp(now if now is not None else time.time(), UTC).strftime("%Y-%m-%d")


class ServerDB:
    """The server's tables. Used from one thread (the server's event loop, or the `users` CLI)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)  # it holds the provider keys
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- users ----------------------------------------------------------------

    def add_user(self, name: str, role: str, token_hash: str, webhook_secret: str) -> User:
        self._db.execute(
            "INSERT INTO users (name, role, token_hash, webhook_secret, created) VALUES (?, ?, ?, ?, ?)",
            (name, role, token_hash, webhook_secret, time.time()),
        )
        user = self.get_user(name)
        assert user is not None
        return user

    def get_user(self, name: str) -> User | None:
        row = self._db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else User(*row)

    def user_by_token_hash(self, token_hash: str) -> User | None:
        row = self._db.execute("SELECT * FROM users WHERE token_hash = ?", (token_hash,)).fetchone()
        return None if row is None else User(*row)

    def list_users(self) -> list[User]:
        return [User(*r) for r in self._db.execute("SELECT * FROM users ORDER BY name")]

    def update_user(self, name: str, **fields: Any) -> None:
        allowed = {"role", "token_hash", "weight", "max_jobs", "usd_per_day", "usd_per_month", "webhook_url"}
        sets = [k for k in fields if k in allowed]
        if sets:
            self._db.execute(
                f"UPDATE users SET {', '.join(f'{k} = ?' for k in sets)} WHERE name = ?",
                [fields[k] for k in sets] + [name],
            )

    def remove_user(self, name: str) -> bool:
        return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    # --- credentials ------------------------------------------------------------

    def put_credential(self, name: str, provider: str, base_url: str | None, api_key: str | None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?, ?)", (name, provider, base_url, api_key, time.time())
        )

    def get_credential(self, name: str) -> Credential | None:
        row = self._db.execute("SELECT * FROM credentials WHERE name = ?", (name,)).fetchone()
        return None if row is None else Credential(*row)

    def list_credentials(self) -> list[Credential]:
        return [Credential(*r) for r in self._db.execute("SELECT * FROM credentials ORDER BY name")]

    def remove_credential(self, name: str) -> bool:
        return self._db.execute("DELETE FROM credentials WHERE name = ?", (name,)).rowcount > 0

    # --- uploads ------------------------------------------------------------------

    def add_upload(self, upload: Upload) -> None:
        self._db.execute(
            "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?)",
            (upload.id, upload.owner, upload.filename, upload.path, upload.size, upload.created),
        )

    def get_upload(self, upload_id: str) -> Upload | None:
        row = self._db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        return None if row is None else Upload(*row)

    # --- jobs -----------------------------------------------------------------------

    def add_job(self, job: ServerJob) -> None:
        self._db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id, job.owner, job.credential, job.priority, job.webhook_url, json.dumps(job.spec),
                job.rows_total, job.output_path, job.status, job.reason, job.created, job.updated,
            ),
        )

    def get_job(self, job_id: str) -> ServerJob | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def list_jobs(self, owner: str | None = None, status: str | None = None, limit: int = 200) -> list[ServerJob]:
        sql, params = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        sql += " ORDER BY created DESC LIMIT ?"
        params.append(limit)
        return [self._job(r) for r in self._db.execute(sql, params)]

    def queued_jobs(self) -> list[ServerJob]:
        """Queued jobs in the order they may start: higher priority first, then oldest first."""
        rows = self._db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY priority DESC, created")
        return [self._job(r) for r in rows]

    def set_job_status(self, job_id: str, status: str, reason: str | None = None) -> None:
        self._db.execute(
            "UPDATE jobs SET status = ?, reason = ?, updated = ? WHERE id = ?", (status, reason, time.time(), job_id)
        )

    def set_job_reason(self, job_id: str, reason: str | None) -> None:
        self._db.execute("UPDATE jobs SET reason = ?, updated = ? WHERE id = ? AND reason IS NOT ?", (reason, time.time(), job_id, reason))

    def requeue_interrupted(self) -> list[str]:
        """At start: every job that was running when the server stopped goes back to the queue."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'running'")]
        self._db.execute(
            "UPDATE jobs SET status = 'queued', reason = 'resuming after a server restart', updated = ? WHERE status = 'running'",
            (time.time(),),
        )
        return ids

    def count_by_status(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    @staticmethod
    def _job(row: tuple[Any, ...]) -> ServerJob:
        values = list(row)
        values[5] = json.loads(values[5])
        return ServerJob(*values)

    # --- spend ------------------------------------------------------------------------

    def add_spend(self, owner: str, usd: float, day: str | None = None) -> None:
        self._db.execute(
            "INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT(owner, day) DO UPDATE SET usd = usd + excluded.usd",
            (owner, day or today(), usd),
        )

    def spend(self, owner: str, day: str | None = None) -> tuple[float, float]:
        """(spent today, spent this month) in USD."""
        d = day or today()
        on_day = self._db.execute("SELECT usd FROM spend WHERE owner = ? AND day = ?", (owner, d)).fetchone()
        month = self._db.execute("SELECT SUM(usd) FROM spend WHERE owner = ? AND day LIKE ?", (owner, d[:7] + "-%")).fetchone()
        return (on_day[0] if on_day else 0.0), (month[0] or 0.0)

    # --- lanes ------------------------------------------------------------------------

    def ensure_lane(self, lane_id: str, name: str) -> LaneRow:
        self._db.execute("INSERT OR IGNORE INTO lanes (id, name) VALUES (?, ?)", (lane_id, name))
        lane = self.get_lane(lane_id)
        assert lane is not None
        return lane

    def get_lane(self, lane_id: str) -> LaneRow | None:
        row = self._db.execute("SELECT * FROM lanes WHERE id = ?", (lane_id,)).fetchone()
        return None if row is None else LaneRow(*row)

    def list_lanes(self) -> list[LaneRow]:
        return [LaneRow(*r) for r in self._db.execute("SELECT * FROM lanes ORDER BY name")]

    def set_lane_limits(self, lane_id: str, rpm: float | None, tpm: float | None, max_in_flight: int | None) -> None:
        self._db.execute("UPDATE lanes SET rpm = ?, tpm = ?, max_in_flight = ? WHERE id = ?", (rpm, tpm, max_in_flight, lane_id))

    # --- webhook deliveries -------------------------------------------------------------

    def add_delivery(self, job_id: str, owner: str, url: str, event: str, body: str) -> None:
        self._db.execute(
            "INSERT INTO deliveries (job_id, owner, url, event, body, next_at) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, owner, url, event, body, time.time()),
        )

    def due_deliveries(self, now: float) -> list[Delivery]:
        rows = self._db.execute("SELECT * FROM deliveries WHERE done = 0 AND next_at <= ? ORDER BY next_at", (now,))
        return [Delivery(*r) for r in rows]

    def next_delivery_at(self) -> float | None:
        row = self._db.execute("SELECT MIN(next_at) FROM deliveries WHERE done = 0").fetchone()
        return row[0]

    def delivery_done(self, delivery_id: int, attempts: int, error: str | None) -> None:
        self._db.execute(
            "UPDATE deliveries SET done = 1, attempts = ?, last_error = ? WHERE id = ?", (attempts, error, delivery_id)
        )

    def delivery_retry(self, delivery_id: int, attempts: int, next_at: float, error: str) -> None:
        self._db.execute(
            "UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?", (attempts, next_at, error, delivery_id)
        )
