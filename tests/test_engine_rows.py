"""Row-level outcomes and job-level stops: dead letters with reasons, fatal errors, the cache across jobs, the breaker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import backfill
from backfill.engine import open_store
from backfill.engine.breaker import CircuitBreaker
from backfill.errors import FatalProviderError, SpecError
from backfill.sim import Faults, KeyLimits, SimConfig, Simulator
from backfill.sim.config import ModelInfo, default_models
from backfill.spec import from_options
from conftest import make_rows

PROMPT = "Row {{ id }} says: {{ text }}"
SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["a", "b"]}, "n": {"type": "integer"}},
    "required": ["label", "n"],
}


async def test_invalid_output_is_retried_then_dead_lettered_with_the_raw_text(tmp_path: Path) -> None:
    async with Simulator(SimConfig(faults=Faults(truncate=1.0))) as sim:
        out = await backfill.arun(
            make_rows(20).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
            schema=SCHEMA, id_column="id", state_dir=tmp_path, progress=False, return_type="arrow",
        )
        sent = len(sim.log)
    assert set(out.column("status").to_pylist()) == {"failed"}
    assert all(e.startswith("invalid output") for e in out.column("error").to_pylist())
    assert sent == 20 * 3  # invalid_output_attempts defaults to 3
    store = open_store(tmp_path)
    dead = store.dead_letters(store.list_jobs()[0].id)
    store.close()
    assert len(dead) == 20 and all(d.raw for d in dead)


async def test_a_row_too_long_for_the_context_is_a_dead_letter_and_the_rest_succeed(tmp_path: Path) -> None:
    models = default_models() | {"gpt-4o-mini": ModelInfo(context_window=40)}
    rows = make_rows(30).to_pandas()
    rows.loc[7, "text"] = "very long " * 50
    async with Simulator(SimConfig(models=models)) as sim:
        out = await backfill.arun(
            rows, prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id",
            state_dir=tmp_path, progress=False, return_type="arrow", params={"max_tokens": 5},
        )
    status = dict(zip(out.column("id").to_pylist(), out.column("status").to_pylist()))
    errors = dict(zip(out.column("id").to_pylist(), out.column("error").to_pylist()))
    assert status.pop("id-000007") == "failed" and "context" in errors["id-000007"].lower()
    assert set(status.values()) == {"ok"}


@pytest.mark.parametrize(
    ("config", "model", "expected"),
    [
        (SimConfig(default_limits=KeyLimits(quota_exhausted=True)), "gpt-4o-mini", "quota"),
        (SimConfig(), "gpt-no-such-model", "404"),
    ],
    ids=["quota", "unknown-model"],
)
async def test_fatal_errors_stop_the_job_at_once(tmp_path: Path, config: SimConfig, model: str, expected: str) -> None:
    async with Simulator(config) as sim:
        with pytest.raises(FatalProviderError, match=expected):
            await backfill.arun(
                make_rows(500).to_pandas(), prompt=PROMPT, model=model, provider="sim", base_url=sim.base_url,
                state_dir=tmp_path, progress=False, prices={model: {"input": 0.1, "output": 0.1}},
            )
        assert len(sim.log) <= 10


async def test_identical_requests_are_sent_once_within_and_across_jobs(tmp_path: Path) -> None:
    rows = make_rows(100).to_pandas()
    rows["text"] = rows["text"].str.len().astype(str)  # many rows share a text
    async with Simulator(SimConfig()) as sim:
        kwargs = dict(prompt="Length {{ text }}", model="gpt-4o-mini", provider="sim", base_url=sim.base_url, state_dir=tmp_path, progress=False)
        first = await backfill.arun(rows, id_column="id", **kwargs)
        assert len(sim.log) == rows["text"].nunique()
        second = await backfill.arun(rows, columns=["text"], **kwargs)  # another job over the same requests
        assert len(sim.log) == rows["text"].nunique()
    assert list(first["output"]) == list(second["output"])
    assert len(second) == 100 and list(second["row_id"]) == list(range(100))


async def test_polars_in_polars_out(tmp_path: Path) -> None:
    pl = pytest.importorskip("polars")
    frame = pl.from_arrow(make_rows(40))
    async with Simulator(SimConfig()) as sim:
        out = await backfill.arun(
            frame, prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id",
            state_dir=tmp_path, progress=False, return_type="polars",
        )
    assert isinstance(out, pl.DataFrame)
    assert out["id"].to_list() == frame["id"].to_list()


def test_run_works_synchronously_and_inside_a_running_loop(tmp_path: Path) -> None:
    with Simulator(SimConfig()) as sim:
        kwargs = dict(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, state_dir=tmp_path, progress=False)
        plain = backfill.run(make_rows(10).to_pandas(), **kwargs)

        async def in_a_notebook():
            return backfill.run(make_rows(10).to_pandas(), **kwargs)

        nested = asyncio.run(in_a_notebook())
    assert list(plain["output"]) == list(nested["output"])


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(SpecError, match="limits.rpm"):
        from_options(prompt="x", model="m", rpm=-5)
    with pytest.raises(SpecError, match="task.schema"):
        from_options(prompt="x", model="m", schema={"type": "object", "properties": {"a": {"type": "nonsense"}}})
    with pytest.raises(SpecError, match="task.model"):
        from_options(prompt="x")


def test_yaml_job_file(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text('{"type": "object", "properties": {"x": {"type": "string"}}}')
    (tmp_path / "job.yaml").write_text(
        "input:\n  path: in.csv\ntask:\n  model: gpt-4o-mini\n  prompt: 'Hi {{ name }}'\n  schema: s.json\n  params:\n    temperature: 0\noutput:\n  path: out.jsonl\n"
    )
    spec = from_options(job_file=tmp_path / "job.yaml", rpm=100)
    assert spec.input.path == str(tmp_path / "in.csv")
    assert spec.task.schema_ == {"type": "object", "properties": {"x": {"type": "string"}}}
    assert spec.task.params == {"temperature": 0} and spec.limits.rpm == 100


async def test_circuit_breaker_opens_on_a_failure_spike_and_closes_after_cooldown() -> None:
    breaker = CircuitBreaker(window=10, threshold=0.5, cooldown_s=0.05)
    for _ in range(4):
        breaker.record(True)
    for _ in range(6):
        breaker.record(False)
    assert not breaker.is_open  # 40% failures: below the threshold
    for _ in range(10):
        breaker.record(True)
    assert breaker.is_open and breaker.opened == 1
    await asyncio.wait_for(breaker.wait(), 1.0)
    assert not breaker.is_open


async def test_a_request_every_row_gets_rejected_for_stops_the_job(tmp_path: Path) -> None:
    models = default_models() | {"gpt-4o-mini": ModelInfo(context_window=5)}
    async with Simulator(SimConfig(models=models)) as sim:
        with pytest.raises(FatalProviderError, match="first 20 requests all failed the same way"):
            await backfill.arun(
                make_rows(1000).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
                state_dir=tmp_path, progress=False, max_in_flight=4,
            )
        assert len(sim.log) < 40


def test_a_ledger_from_before_the_request_counts_opens_and_resumes_counting(tmp_path: Path) -> None:
    """A ledger written before `requests` and `rate_limited` existed gains them instead of breaking every command."""
    import sqlite3

    path = tmp_path / "backfill.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,"
        " spec TEXT NOT NULL, input_fingerprint TEXT NOT NULL, rows_total INTEGER, chunks_total INTEGER,"
        " rows_ok INTEGER NOT NULL DEFAULT 0, rows_failed INTEGER NOT NULL DEFAULT 0, spent_usd REAL NOT NULL DEFAULT 0,"
        " input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0, requested TEXT,"
        " created REAL NOT NULL, updated REAL NOT NULL)"
    )
    db.execute("INSERT INTO jobs VALUES ('j1', 'me', 'paused', NULL, '{}', 'fp', 10, 1, 4, 1, 0.5, 100, 20, NULL, 1.0, 2.0)")
    db.commit()
    db.close()
    store = open_store(tmp_path)
    try:
        store.add_request_counts("j1", 7, 2)
        job = store.get_job("j1")
        assert job is not None
        assert (job.rows_ok, job.spent_usd, job.requested, job.created, job.updated) == (4, 0.5, None, 1.0, 2.0)
        assert (job.requests, job.rate_limited) == (7, 2)
        assert [j.id for j in store.list_jobs()] == ["j1"]
    finally:
        store.close()
