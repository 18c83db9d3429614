"""A real job on the simulator where tokens/min binds because max_tokens is unset: the progress says so and names the flag;
the ledger keeps the rows answered so far."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from rich.console import Console

from backfill import engine
from backfill.engine.stats import JobStats
from backfill.progress import show_progress
from backfill.sim import SimConfig, Simulator
from backfill.spec import from_options
from backfill.status import JobStatus, StopCause
from backfill.store import Store
from conftest import make_rows


async def progress_lines_of_a_job(tmp_path: Path) -> tuple[list[str], JobStats]:
    """Run a job at 600,000 tokens/min, max_tokens unset, until its log has shown a few progress lines, then pause it."""
    out = io.StringIO()
    stats: list[JobStats] = []
    async with Simulator(SimConfig(latency_s=0.01)) as sim:
        spec = from_options(
            prompt="Row {{ id }}: {{ text }}", model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id",
            tpm=600_000, chunk_size=20,
        )
        tasks: list[asyncio.Task[None]] = []

        def on_start(runner: engine.JobRunner) -> None:
            stats.append(runner.stats)
            tasks.append(asyncio.create_task(show_progress(runner.stats, Console(file=out), log_every_s=0.25, log_format="json")))

            async def pause_after_lines() -> None:
                while out.getvalue().count("\n") < 9:  # the start line and eight progress lines (2 s)
                    await asyncio.sleep(0.05)
                runner.stop(JobStatus.PAUSED, "seen enough", cause=StopCause.PAUSE, hard=True)

            tasks.append(asyncio.create_task(pause_after_lines()))

        try:
            await engine.run_job(spec, data=make_rows(2_000), state_dir=tmp_path, on_start=on_start)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return out.getvalue().splitlines(), stats[0]


async def test_tokens_per_minute_binding_on_unset_max_tokens_is_named(tmp_path: Path) -> None:
    lines, stats = await progress_lines_of_a_job(tmp_path)
    records = [json.loads(line) for line in lines]
    last = [r for r in records if r["event"] == "progress"][-1]
    assert last["tpm_limit"] == 600_000
    assert last["binding"] == "tokens/min"
    assert "max_tokens is unset" in last["binding_note"] and "--max-tokens" in last["binding_note"]
    # The pace shown is per minute, as the limit is counted, and never far above it.
    assert 0 < last["tokens_per_min"] <= 600_000 * 1.2

    # The ledger's live counter (what `status` shows during a run) holds the rows answered, committed or not.
    store = Store(tmp_path / "backfill.db")
    try:
        (job,) = store.list_jobs()
    finally:
        store.close()
    assert job.rows_answered == stats.rows_done > 0 and job.rows_answered >= job.rows_done


def test_the_heartbeat_records_rows_answered_and_keeps_it_when_not_given(tmp_path: Path) -> None:
    store = Store(tmp_path / "backfill.db")
    try:
        store.upsert_job("j1", owner="me", spec={}, input_fingerprint="f")
        assert store.try_lease("j1", "holder", 30) is None
        assert store.heartbeat("j1", "holder", 30, rows_answered=17)
        assert store.heartbeat("j1", "holder", 30)
        job = store.get_job("j1")
        assert job is not None and job.rows_answered == 17 and job.rows_done == 0
        assert not store.heartbeat("j1", "someone else", 30, rows_answered=99)
        assert store.get_job("j1").rows_answered == 17
    finally:
        store.close()
