"""The ledger on real SQLite files: migrations, status and stop cause, the job lease, the scoped cache, spend, write failures."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from backfill.status import JobStatus, StopCause
from backfill.store import MIGRATIONS, CachedResponse, DeadLetter, Migration, Store, StoreError, migrate

# The schema before numbered migrations, as the first releases wrote it (copied, not imported: it must not change).
OLD_SCHEMA = """
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


def answer(text: str = "yes", cost: float = 0.01, tin: int = 10, tout: int = 5) -> CachedResponse:
    return CachedResponse(text, None, tin, tout, 0, cost)


def new_job(store: Store, job_id: str = "j1") -> None:
    store.upsert_job(job_id, owner="me", spec={"model": "m"}, input_fingerprint="fp")


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "backfill.db")
    yield s
    s.close()


def versions(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        db.close()


# --- migrations ------------------------------------------------------------------


def test_a_fresh_ledger_records_every_step(tmp_path: Path) -> None:
    Store(tmp_path / "backfill.db").close()
    assert versions(tmp_path / "backfill.db") == [m.version for m in MIGRATIONS]
    # opening again applies nothing twice
    Store(tmp_path / "backfill.db").close()
    assert versions(tmp_path / "backfill.db") == [m.version for m in MIGRATIONS]


@pytest.mark.parametrize("counters", [True, False], ids=["old-schema", "before-request-counts"])
def test_a_ledger_from_before_migrations_keeps_its_rows_and_gains_the_new_columns(tmp_path: Path, counters: bool) -> None:
    path = tmp_path / "backfill.db"
    schema = OLD_SCHEMA
    if not counters:
        schema = schema.replace("    requests INTEGER NOT NULL DEFAULT 0,\n    rate_limited INTEGER NOT NULL DEFAULT 0,\n", "")
    db = sqlite3.connect(path)
    db.executescript(schema)
    columns = "id, owner, status, reason, spec, input_fingerprint, rows_total, chunks_total, rows_ok, rows_failed, spent_usd, input_tokens, output_tokens, requested, created, updated"
    db.execute(f"INSERT INTO jobs ({columns}) VALUES ('j1', 'me', 'paused', 'stopped', '{{}}', 'fp', 10, 1, 4, 1, 0.5, 100, 20, NULL, 1.0, 2.0)")
    db.execute("INSERT INTO chunks VALUES ('j1', 0, 4, 1, 1.5)")
    db.execute("INSERT INTO cache VALUES ('k1', 'old answer', NULL, 3, 2, 0, 0.25, 1.0)")
    db.commit()
    db.close()

    store = Store(path)
    try:
        job = store.get_job("j1")
        assert job is not None
        assert (job.status, job.reason, job.rows_ok, job.rows_failed, job.spent_usd, job.created) == (JobStatus.PAUSED, "stopped", 4, 1, 0.5, 1.0)
        assert (job.requests, job.rate_limited, job.answers, job.stop_cause, job.lease_holder) == (0, 0, 0, None, None)
        assert store.done_chunks("j1") == {0}
        # the old cache row moved into the default scope, with nobody recorded as its payer
        assert store.get_responses(["k1"]) == {"k1": CachedResponse("old answer", None, 3, 2, 0, 0.25)}
        assert store.clear_cache(job_id="j1") == 0
        # and the new columns work
        store.mark_chunk_done("j1", 1, 3, [], requests=7, rate_limited=2)
        store.set_status("j1", JobStatus.PAUSED, "paused by request", StopCause.PAUSE)
        assert store.try_lease("j1", "1@a") is None
        job = store.get_job("j1")
        assert job is not None
        assert (job.requests, job.rate_limited, job.stop_cause, job.lease_holder) == (7, 2, StopCause.PAUSE, "1@a")
    finally:
        store.close()
    assert versions(path) == [m.version for m in MIGRATIONS]


def test_a_ledger_from_a_newer_backfill_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "backfill.db"
    Store(path).close()
    newer = MIGRATIONS[-1].version + 2
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (newer,))
    db.commit()
    db.close()
    with pytest.raises(StoreError) as e:
        Store(path)
    assert str(e.value) == (
        f"The ledger at {path} was written by a newer backfill (schema {newer}, this one knows {MIGRATIONS[-1].version}); upgrade backfill."
    )


def test_a_failing_step_leaves_nothing_of_it_applied(tmp_path: Path) -> None:
    path = tmp_path / "backfill.db"

    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x INTEGER)")
        db.execute("ALTER TABLE jobs ADD COLUMN half INTEGER")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    steps = (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "breaks", half_then_fail))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        with pytest.raises(StoreError, match=rf"could not be upgraded to schema {steps[-1].version} \(breaks"):
            migrate(db, path, steps)
        assert not db.in_transaction
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
        assert "half" not in {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    finally:
        db.close()
    # the steps before it stand, and the ledger still opens with this backfill's steps
    assert versions(path) == [m.version for m in MIGRATIONS]
    Store(path).close()


def test_processes_opening_a_fresh_ledger_at_once_apply_each_step_once(tmp_path: Path) -> None:
    """Four openers race for each of 20 fresh files: for the switch to WAL (SQLite answers the loser
    "database is locked" without waiting) and for every migration step."""
    def open_it(path: Path, start: threading.Barrier, errors: list[BaseException]) -> None:
        start.wait()
        try:
            Store(path).close()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    for n in range(20):
        path = tmp_path / f"backfill-{n}.db"
        start = threading.Barrier(4)
        errors: list[BaseException] = []
        threads = [threading.Thread(target=open_it, args=(path, start, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert versions(path) == [m.version for m in MIGRATIONS]


# --- status, stop cause ---------------------------------------------------------------


def test_status_and_stop_cause_are_stored_as_enums(store: Store) -> None:
    new_job(store)
    store.request("j1", "pause")
    store.set_status("j1", JobStatus.PAUSED, "paused by request", StopCause.PAUSE)
    job = store.get_job("j1")
    assert job is not None
    assert job.status is JobStatus.PAUSED and job.status == "paused"
    assert job.stop_cause is StopCause.PAUSE
    assert job.requested is None
    store.set_status("j1", "running")  # a plain string still works, and the cause is cleared
    job = store.get_job("j1")
    assert job is not None
    assert (job.status, job.stop_cause, job.reason) == (JobStatus.RUNNING, None, None)
    with pytest.raises(ValueError):
        store.set_status("j1", "finished-ish")


# --- the job lease -----------------------------------------------------------------------


def test_one_lease_per_job_across_two_stores_and_take_over_when_it_expires(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "backfill.db"), Store(tmp_path / "backfill.db")
    try:
        new_job(a)
        assert a.try_lease("j1", "1@hostA") is None
        assert b.try_lease("j1", "2@hostB") == "1@hostA"
        assert a.try_lease("j1", "1@hostA") is None  # ours already: renewed
        assert a.heartbeat("j1", "1@hostA")
        assert not b.heartbeat("j1", "2@hostB")
        b.release_lease("j1", "2@hostB")  # not ours: nothing happens
        assert b.try_lease("j1", "2@hostB") == "1@hostA"

        # A's heartbeat stops: the lease expires and B takes it over; A learns it lost it.
        assert a.try_lease("j1", "1@hostA", ttl_s=-1.0) is None
        assert b.try_lease("j1", "2@hostB") is None
        job = a.get_job("j1")
        assert job is not None and job.lease_holder == "2@hostB"
        assert job.lease_until is not None and job.lease_until > time.time()
        assert not a.heartbeat("j1", "1@hostA")
        assert a.try_lease("j1", "1@hostA") == "2@hostB"

        b.release_lease("j1", "2@hostB")
        job = a.get_job("j1")
        assert job is not None and (job.lease_holder, job.lease_until) == (None, None)
        assert a.try_lease("j1", "1@hostA") is None
        with pytest.raises(StoreError, match="no job nope"):
            a.try_lease("nope", "1@hostA")
    finally:
        a.close()
        b.close()


# --- cache, spend, counts -------------------------------------------------------------------


def test_the_cache_is_scoped_and_records_who_paid(store: Store) -> None:
    new_job(store, "j1")
    new_job(store, "j2")
    store.put_response("j1", "k", answer("for everyone"))
    store.put_response("j2", "k", answer("for alice"), scope="alice")
    assert store.get_responses(["k"])["k"].text == "for everyone"
    assert store.get_responses(["k"], scope="alice")["k"].text == "for alice"
    assert store.get_responses(["k"], scope="bob") == {}
    assert store.clear_cache(job_id="j2") == 1
    assert store.get_responses(["k"], scope="alice") == {}
    assert store.get_responses(["k"])["k"].text == "for everyone"


def test_billed_answers_without_a_cache_entry_count_in_spend_and_answers(store: Store) -> None:
    new_job(store)
    store.put_response("j1", "k1", answer(cost=0.5, tin=10, tout=4))
    store.add_spend("j1", 0.25, 8, 6)  # e.g. an answer that failed its schema
    store.add_spend("j1", 0.25, 2, 2)
    job = store.get_job("j1")
    assert job is not None
    assert (job.spent_usd, job.input_tokens, job.output_tokens, job.answers) == (1.0, 20, 12, 3)
    assert set(store.get_responses(["k1", "k2"])) == {"k1"}


async def test_spend_and_answers_commit_together_at_the_end_of_the_tick(store: Store) -> None:
    new_job(store)
    store.put_response("j1", "k1", answer(cost=0.5))
    store.add_spend("j1", 0.25, 1, 1)
    other = Store(store.path)
    try:
        job = other.get_job("j1")
        assert job is not None and job.answers == 0  # queued, not yet committed
        await asyncio.sleep(0)
        job = other.get_job("j1")
        assert job is not None and (job.spent_usd, job.answers) == (0.75, 2)
        assert set(other.get_responses(["k1"])) == {"k1"}
    finally:
        other.close()


def test_a_chunk_commit_adds_its_request_counts(store: Store) -> None:
    new_job(store)
    store.mark_chunk_done("j1", 0, 9, [DeadLetter("r9", 0, "refused")], requests=12, rate_limited=3)
    store.mark_chunk_done("j1", 1, 10, [])
    store.add_request_counts("j1", 1, 1)
    job = store.get_job("j1")
    assert job is not None
    assert (job.rows_ok, job.rows_failed, job.requests, job.rate_limited) == (19, 1, 13, 4)


def test_clear_cache_by_each_filter(store: Store) -> None:
    new_job(store, "j1")
    new_job(store, "j2")
    for key, job, scope in [("a", "j1", ""), ("b", "j1", "alice"), ("c", "j2", ""), ("d", "j2", "alice")]:
        store.put_response(job, key, answer(), scope=scope)
    store.flush()
    store._db.execute("UPDATE cache SET created = ? WHERE request_key IN ('a', 'b')", (time.time() - 3600,))

    def keys() -> set[tuple[str, str]]:
        return set(store._db.execute("SELECT scope, request_key FROM cache"))

    assert store.clear_cache(older_than_s=1800, scope="alice") == 1
    assert keys() == {("", "a"), ("", "c"), ("alice", "d")}
    assert store.clear_cache(older_than_s=1800) == 1
    assert keys() == {("", "c"), ("alice", "d")}
    assert store.clear_cache(scope="alice") == 1
    assert store.clear_cache(job_id="j1") == 0
    assert store.clear_cache(job_id="j2") == 1
    store.put_response("j1", "e", answer())
    store.put_response("j1", "f", answer(), scope="x")
    assert store.clear_cache() == 2  # no filter: everything, including what was still queued
    assert keys() == set()


def test_structured_modes_per_endpoint_and_model(tmp_path: Path) -> None:
    a = Store(tmp_path / "backfill.db")
    try:
        assert a.get_structured_mode("https://api.example/v1", "m1") is None
        a.set_structured_mode("https://api.example/v1", "m1", "json_schema")
        a.set_structured_mode("https://api.example/v1", "m2", "tools")
        a.set_structured_mode("https://api.example/v1", "m1", "json_object")
    finally:
        a.close()
    b = Store(tmp_path / "backfill.db")
    try:
        assert b.get_structured_mode("https://api.example/v1", "m1") == "json_object"
        assert b.get_structured_mode("https://api.example/v1", "m2") == "tools"
        assert b.get_structured_mode("https://other/v1", "m1") is None
    finally:
        b.close()


# --- write failures -------------------------------------------------------------------------


def fill_the_disk(store: Store) -> None:
    """SQLite's own disk-full: the file may not grow by a page."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def free_the_disk(store: Store) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


def test_a_full_disk_raises_store_error_and_keeps_the_queued_answers(store: Store) -> None:
    new_job(store)
    store.flush()
    fill_the_disk(store)
    big = answer("x" * 200_000, cost=0.5)
    with pytest.raises(StoreError, match=r"could not be written \(database or disk is full\); free disk space") as e:
        store.put_response("j1", "k1", big)  # no running loop: committed at once
    assert isinstance(e.value.__cause__, sqlite3.Error)
    assert store.failed is e.value
    with pytest.raises(StoreError):
        store.mark_chunk_done("j1", 0, 1, [])
    assert store.done_chunks("j1") == set()
    # the job can still be marked failed, with its sentence
    store.set_status("j1", JobStatus.FAILED, str(e.value), StopCause.FATAL)
    job = store.get_job("j1")
    assert job is not None and (job.status, job.stop_cause, job.spent_usd) == (JobStatus.FAILED, StopCause.FATAL, 0.0)

    free_the_disk(store)
    store.flush()
    assert store.failed is None
    assert store.get_responses(["k1"])["k1"].text == big.text
    job = store.get_job("j1")
    assert job is not None and (job.spent_usd, job.answers) == (0.5, 1)


async def test_a_failed_commit_in_the_tick_reaches_the_next_write(store: Store) -> None:
    new_job(store)
    fill_the_disk(store)
    unhandled: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unhandled.append(context))
    store.put_response("j1", "k1", answer("x" * 200_000, cost=0.5))  # queued; the commit runs after this tick
    await asyncio.sleep(0)
    assert isinstance(store.failed, StoreError)
    assert unhandled == []  # kept for the engine, not thrown at the event loop
    with pytest.raises(StoreError, match="database or disk is full"):
        store.add_spend("j1", 0.25, 1, 1)
    with pytest.raises(StoreError, match="database or disk is full"):
        store.flush()
    free_the_disk(store)
    store.flush()
    job = store.get_job("j1")
    assert job is not None and (job.spent_usd, job.answers) == (0.75, 2)
    assert set(store.get_responses(["k1"])) == {"k1"}

