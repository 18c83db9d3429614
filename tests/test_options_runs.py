"""What a re-run, a resume and `--json` say: resuming counts, a complete job, a cancelled job needing --force, `jobs` at 80 columns."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from backfill.cli import app
from backfill.errors import SpecError
from conftest import make_rows, run_cli

SUMMARY_FIELDS = {
    "job_id", "status", "stop_cause", "reason", "rows_total", "rows_ok", "rows_failed", "requests", "requests_this_run",
    "rows_from_cache", "rate_limited", "input_tokens", "output_tokens", "cost_usd", "output",
}


def _args(src: Path, out: Path, state: Path, *extra: str) -> list[str]:
    return [
        "run", "-i", str(src), "--id-column", "id", "-p", "Say {{ text }}", "-m", "gpt-4o-mini", "--max-tokens", "20",
        "-o", str(out), "--state-dir", str(state), "--quiet", *extra,
    ]


def test_run_json_then_a_rerun_says_complete_and_jobs_fit_80_columns(tmp_path: Path) -> None:
    src = tmp_path / "reviews-2026.parquet"
    pq.write_table(make_rows(20), src)
    out, state = tmp_path / "answers.parquet", tmp_path / "state"
    runner = CliRunner()
    first = runner.invoke(app, _args(src, out, state, "--json"))
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert set(summary) == SUMMARY_FIELDS
    assert summary["status"] == "succeeded" and summary["rows_ok"] == 20 and summary["requests_this_run"] == 20
    assert summary["output"] == str(out)

    again = runner.invoke(app, _args(src, out, state))
    assert again.exit_code == 0, again.output
    assert f"job {summary['job_id']} is already complete" in again.stderr and str(out) in again.stderr
    assert "requests 0" not in again.stderr

    # A real process: the terminal's width is read when the CLI starts.
    listed = asyncio.run(run_cli("jobs", "--state-dir", str(state), env={"COLUMNS": "80"}))
    assert listed.returncode == 0, listed.stderr
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    assert re.search(rf"\b{summary['job_id']}\b", listed.stdout)  # the whole id, on one line
    for name in ("reviews-2026.parquet", "answers.parquet", "20/20"):
        assert name in listed.stdout

    status = runner.invoke(app, ["status", summary["job_id"][:6], "--state-dir", str(state), "--json"])
    assert status.exit_code == 0, status.output
    record = json.loads(status.stdout)
    assert {k: record[k] for k in ("job_id", "rows_ok", "rows_failed", "requests", "output")} == {
        k: summary[k] for k in ("job_id", "rows_ok", "rows_failed", "requests", "output")
    }


def test_resume_says_what_is_left_and_a_cancelled_job_needs_force(tmp_path: Path) -> None:
    src = tmp_path / "rows.parquet"
    pq.write_table(make_rows(12), src)
    state = tmp_path / "state"
    runner = CliRunner()
    # A budget of about two rows stops the job early with some rows committed (one row a chunk).
    stopped = runner.invoke(app, _args(src, tmp_path / "o.parquet", state, "--chunk-size", "1", "--max-in-flight", "1", "--budget-usd", "0.00003", "--allow-partial", "--json"))
    assert stopped.exit_code == 4, stopped.output
    first = json.loads(stopped.stdout)
    job, done = first["job_id"], first["rows_ok"]
    assert 0 < done < 12

    runner.invoke(app, ["cancel", job, "--state-dir", str(state)])
    refused = runner.invoke(app, ["resume", job, "--state-dir", str(state), "--quiet", "--budget-usd", "1"])
    assert isinstance(refused.exception, SpecError) and "--force" in str(refused.exception) and job in str(refused.exception)

    resumed = runner.invoke(app, ["resume", job, "--state-dir", str(state), "--quiet", "--budget-usd", "1", "--force"])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming job {job}: {done:,} rows already answered, {12 - done:,} left" in resumed.stderr


def test_status_of_a_running_job_shows_rows_answered_beside_those_committed(tmp_path: Path) -> None:
    from backfill.status import JobStatus
    from backfill.store.sqlite import Store

    store = Store(tmp_path / "backfill.db")
    try:
        spec = {"task": {"model": "gpt-4o-mini", "provider": "sim"}, "input": {"path": "in.parquet"}, "output": {"path": "o.parquet"}}
        store.upsert_job("j00000000001", owner="local", spec=spec, input_fingerprint="f")
        store.set_status("j00000000001", JobStatus.RUNNING)
        assert store.try_lease("j00000000001", "1@host", 30) is None
        assert store.heartbeat("j00000000001", "1@host", 30, rows_answered=40)
    finally:
        store.close()
    result = CliRunner().invoke(app, ["status", "j000", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "40 more answered, not yet committed" in " ".join(result.stdout.split())  # wrapped at the console's width
    assert re.search(r"\d\d:\d\d:\d\d running\n", result.stdout) and "running: running" not in result.stdout
    as_json = json.loads(CliRunner().invoke(app, ["status", "j000", "--state-dir", str(tmp_path), "--json"]).stdout)
    assert as_json["rows_answered"] == 40 and as_json["rows_ok"] == 0
