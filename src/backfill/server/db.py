"""The server's own tables (users, credentials and their grants, settings, uploads, jobs as submitted, spend
per day, lanes, webhook deliveries) in one SQLite file under the data directory, next to the engine's ledger.
Provider keys are stored Fernet-encrypted only."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backfill.errors import BackfillError
from backfill.server.caps import Caps, Settings, caps_from_json
from backfill.server.secrets import SECRET_ENV, SecretBox

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
    created REAL NOT NULL,
    caps TEXT
);
CREATE TABLE IF NOT EXISTS credentials (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    base_url TEXT,
    api_key TEXT,
    created REAL NOT NULL,
    api_key_enc TEXT,
    show_base_url INTEGER NOT NULL DEFAULT 0,
    cache_shared INTEGER NOT NULL DEFAULT 0,
    prices TEXT
);
CREATE TABLE IF NOT EXISTS grants (
    credential TEXT NOT NULL,
    user TEXT NOT NULL,
    PRIMARY KEY (credential, user)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
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
    updated REAL NOT NULL,
    cache_scope TEXT
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

# Columns added after the first release: (table, column, declaration), added to an older file on open.
_ADDED = [
    ("users", "caps", "TEXT"),
    ("credentials", "api_key_enc", "TEXT"),
    ("credentials", "show_base_url", "INTEGER NOT NULL DEFAULT 0"),
    ("credentials", "cache_shared", "INTEGER NOT NULL DEFAULT 0"),
    ("credentials", "prices", "TEXT"),
    ("jobs", "cache_scope", "TEXT"),
]
_CREDENTIAL_COLUMNS = "name, provider, base_url, api_key_enc, api_key, created, show_base_url, cache_shared, prices"

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
    caps_json: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"

    @property
    def caps(self) -> Caps:
        return caps_from_json(self.caps_json)


@dataclass(slots=True)
class Credential:
    name: str
    provider: str
    base_url: str | None
    api_key: str | None  # decrypted when read; never stored in the clear
    created: float
    show_base_url: bool  # users may see the base URL
    cache_shared: bool  # one response cache for every user of this credential (default: one per user)
    prices: dict[str, Any]  # USD per 1M tokens by model, over the server-wide table


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
    cache_scope: str = ""  # the response cache it reads and fills, fixed at submit so a resume finds its answers


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


def private_dir(path: Path) -> None:
    """Create `path` (and its parents) readable by this user only; an existing one is made so too."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def today(now: float | None = None) -> str:
    """The UTC day that spend quotas count in."""
    return datetime.fromtimestamp(now if now is not None else time.time(), UTC).strftime("%Y-%m-%d")


class ServerDB:
    """The server's tables. Used from one thread (the server's event loop, or the `users` CLI).

    `box` encrypts provider keys; without it, a credential with a key cannot be stored or read.
    """

    def __init__(self, path: str | Path, box: SecretBox | None = None):
        self.path = Path(path)
        self.box = box
        private_dir(self.path.parent)
        fresh = not self.path.exists()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)  # SQLite gives its -wal and -shm files the same mode
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        if box is not None:
            self._encrypt_legacy_keys(box)

    def _encrypt_legacy_keys(self, box: SecretBox) -> None:
        """Keys stored in the clear by an older version are encrypted, and the clear copy erased."""
        for name, key in self._db.execute("SELECT name, api_key FROM credentials WHERE api_key IS NOT NULL").fetchall():
            self._db.execute("UPDATE credentials SET api_key_enc = ?, api_key = NULL WHERE name = ?", (box.encrypt(key), name))

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
        allowed = {"role", "token_hash", "weight", "max_jobs", "usd_per_day", "usd_per_month", "webhook_url", "caps_json"}
        sets = [k for k in fields if k in allowed]
        if sets:
            columns = {"caps_json": "caps"}
            self._db.execute(
                f"UPDATE users SET {', '.join(f'{columns.get(k, k)} = ?' for k in sets)} WHERE name = ?",
                [fields[k] for k in sets] + [name],
            )

    def remove_user(self, name: str) -> bool:
        self._db.execute("DELETE FROM grants WHERE user = ?", (name,))
        return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    # --- credentials and grants ----------------------------------------------------

    def put_credential(
        self, name: str, provider: str, base_url: str | None, api_key: str | None, *,
        show_base_url: bool = False, cache_shared: bool = False, prices: dict[str, Any] | None = None,
    ) -> None:
        """Add or replace a credential (its grants stay); refused without a secret key to encrypt its key with."""
        encrypted = None
        if api_key is not None:
            if self.box is None:
                raise BackfillError(
                    f"This server has no secret key to encrypt provider keys with; set {SECRET_ENV} (or pass"
                    " --secret-key-file), from `backfill credentials new-key`, then add the credential again."
                )
            encrypted = self.box.encrypt(api_key)
        self._db.execute(
            "INSERT OR REPLACE INTO credentials (name, provider, base_url, api_key, created, api_key_enc, show_base_url,"
            " cache_shared, prices) VALUES (?, ?, ?, NULL, ?, ?, ?, ?, ?)",
            (name, provider, base_url, time.time(), encrypted, int(show_base_url), int(cache_shared), json.dumps(prices or {})),
        )

    def get_credential(self, name: str) -> Credential | None:
        row = self._db.execute(f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._credential(row)

    def list_credentials(self, user: str | None = None) -> list[Credential]:
        """Every credential, or with `user` those granted to that user."""
        if user is None:
            rows = self._db.execute(f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials ORDER BY name")
        else:
            rows = self._db.execute(
                f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials WHERE name IN (SELECT credential FROM grants WHERE user = ?) ORDER BY name",
                (user,),
            )
        return [self._credential(r, decrypt=False) for r in rows.fetchall()]

    def remove_credential(self, name: str) -> bool:
        self._db.execute("DELETE FROM grants WHERE credential = ?", (name,))
        return self._db.execute("DELETE FROM credentials WHERE name = ?", (name,)).rowcount > 0

    def _credential(self, row: tuple[Any, ...], decrypt: bool = True) -> Credential:
        name, provider, base_url, encrypted, legacy, created, show, shared, prices = row
        key = legacy
        if encrypted is not None and decrypt:
            if self.box is None:
                raise BackfillError(f"The key of credential {name} is encrypted and this server has no secret key; set {SECRET_ENV}.")
            key = self.box.decrypt(encrypted)
        return Credential(name, provider, base_url, key, created, bool(show), bool(shared), json.loads(prices or "{}"))

    def rotate_keys(self, box: SecretBox) -> int:
        """Re-encrypt every stored key under `box`'s first key; returns how many."""
        rows = self._db.execute("SELECT name, api_key_enc FROM credentials WHERE api_key_enc IS NOT NULL").fetchall()
        for name, token in rows:
            self._db.execute("UPDATE credentials SET api_key_enc = ? WHERE name = ?", (box.rotate(token), name))
        return len(rows)

    def grant(self, credential: str, user: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO grants VALUES (?, ?)", (credential, user))

    def revoke(self, credential: str, user: str) -> bool:
        return self._db.execute("DELETE FROM grants WHERE credential = ? AND user = ?", (credential, user)).rowcount > 0

    def granted(self, credential: str, user: str) -> bool:
        return self._db.execute("SELECT 1 FROM grants WHERE credential = ? AND user = ?", (credential, user)).fetchone() is not None

    def may_use(self, credential: str, user: str) -> bool:
        """Whether `user` may run jobs on `credential`: operators always, others once granted."""
        found = self.get_user(user)
        return found is not None and (found.is_operator or self.granted(credential, user))

    def grantees(self, credential: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT user FROM grants WHERE credential = ? ORDER BY user", (credential,))]

    # --- settings ---------------------------------------------------------------------

    def get_settings(self) -> Settings:
        row = self._db.execute("SELECT value FROM settings WHERE key = 'server'").fetchone()
        return Settings.model_validate_json(row[0]) if row else Settings()

    def put_settings(self, settings: Settings) -> None:
        self._db.execute("INSERT OR REPLACE INTO settings VALUES ('server', ?)", (settings.model_dump_json(),))

    # --- uploads ------------------------------------------------------------------

    def add_upload(self, upload: Upload) -> None:
        self._db.execute(
            "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?)",
            (upload.id, upload.owner, upload.filename, upload.path, upload.size, upload.created),
        )

    def get_upload(self, upload_id: str) -> Upload | None:
        row = self._db.execute("SELECT * FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        return None if row is None else Upload(*row)

    def uploads_before(self, created: float) -> list[Upload]:
        return [Upload(*r) for r in self._db.execute("SELECT * FROM uploads WHERE created < ?", (created,))]

    def remove_upload(self, upload_id: str) -> None:
        self._db.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))

    def input_in_use(self, path: str) -> bool:
        """Whether a job that may still run reads `path`."""
        rows = self._db.execute("SELECT spec FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")
        return any(json.loads(r[0]).get("input", {}).get("path") == path for r in rows)

    # --- jobs -----------------------------------------------------------------------

    def add_job(self, job: ServerJob) -> None:
        self._db.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id, job.owner, job.credential, job.priority, job.webhook_url, json.dumps(job.spec),
                job.rows_total, job.output_path, job.status, job.reason, job.created, job.updated, job.cache_scope,
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
        values[12] = values[12] or ""
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

    def delivery_hold(self, delivery_id: int, until: float) -> None:
        """A delivery being sent is not due again before `until` (its timeout, with a margin)."""
        self._db.execute("UPDATE deliveries SET next_at = ? WHERE id = ?", (until, delivery_id))

    def job_deliveries(self, job_id: str) -> list[Delivery]:
        rows = self._db.execute("SELECT * FROM deliveries WHERE job_id = ? ORDER BY id", (job_id,))
        return [Delivery(*r) for r in rows]

    def delivery_retry(self, delivery_id: int, attempts: int, next_at: float, error: str) -> None:
        self._db.execute(
            "UPDATE deliveries SET attempts = ?, next_at = ?, last_error = ? WHERE id = ?", (attempts, next_at, error, delivery_id)
        )
