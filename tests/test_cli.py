"""The CLI as a user runs it: crashes with kill -9 and resume, Ctrl-C, exit codes, estimate, status, jobs, cancel."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq

from backfill.sim import SimConfig, Simulator
from conftest import make_rows, run_cli

PROMPT = "Row {{ id }} says: {{ text }}"


def run_args(src: Path, out: Path, state: Path, base_url: str, *extra: str) -> list[str]:
    return [
        "run", "--input", str(src), "--id-column", "id", "--prompt", PROMPT, "--model", "gpt-4o-mini",
        "--provider", "sim", "--base-url", base_url, "--max-tokens", "30", "--output", str(out),
        "--state-dir", str(state), "--quiet", *extra,
    ]


async def _start(args: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backfill", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )


async def _wait_for_requests(sim: Simulator, n: int, proc: asyncio.subprocess.Process) -> None:
    while len(sim.log) < n and proc.returncode is None:
        await asyncio.sleep(0.01)


async def test_kill_9_at_random_points_then_resume_is_exactly_once(tmp_path: Path, rows_parquet) -> None:
    rows = 1500
    in_flight = 8
    src = rows_parquet(rows)
    out, state = tmp_path / "out.parquet", tmp_path / "state"
    rnd = random.Random(11)
    async with Simulator(SimConfig(latency_s=0.01)) as sim:
        args = run_args(src, out, state, sim.base_url, "--max-in-flight", str(in_flight), "--chunk-size", "100")
        kills = 0
        for _ in range(3):
            proc = await _start(args)
            await _wait_for_requests(sim, len(sim.log) + rnd.randint(100, 400), proc)
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            await proc.wait()
        assert kills >= 2
        assert not out.exists()
        final = await run_cli(*args)
        assert final.returncode == 0, final.stderr
        duplicates = sim.log.duplicates()
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == make_rows(rows).column("id").to_pylist()
    for rid, answer in zip(ids, table.column("output").to_pylist()):
        assert answer.startswith(f"Answer to «Row {rid} says:")
    # Only requests in flight at a kill may have been answered twice.
    assert sum(n - 1 for n in duplicates.values()) <= kills * in_flight


async def test_ctrl_c_keeps_answers_and_resume_finishes(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(800)
    out, state = tmp_path / "out.parquet", tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.05)) as sim:
        args = run_args(src, out, state, sim.base_url, "--max-in-flight", "16", "--chunk-size", "50")
        proc = await _start(args)
        await _wait_for_requests(sim, 150, proc)
        proc.send_signal(signal.SIGINT)
        _, err = await proc.communicate()
        assert proc.returncode == 130, err.decode()
        assert "interrupted" in err.decode()
        answered = len(sim.log)
        job_id = err.decode().split("job ")[1].split(":")[0]
        assert f"backfill resume {job_id}" in err.decode()  # the hint names the job
        resumed = await run_cli("resume", job_id, "--state-dir", str(state), "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        assert sim.log.duplicates() == {}  # graceful stop: every answer in flight was kept
        assert len(sim.log) - answered <= 800 - answered
    assert pq.read_table(out).num_rows == 800


async def test_spec_errors_exit_2_with_one_sentence(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(10)
    missing = await run_cli("run", "--input", str(tmp_path / "nope.csv"), "--prompt", "x", "--model", "gpt-4o-mini", "--output", str(tmp_path / "o.parquet"))
    assert missing.returncode == 2 and "nope.csv" in missing.stderr and "Traceback" not in missing.stderr
    bad_column = await run_cli("run", "--input", str(src), "--prompt", "{{ nope }}", "--model", "gpt-4o-mini", "--output", str(tmp_path / "o.parquet"), "--state-dir", str(tmp_path))
    assert bad_column.returncode == 2 and "nope" in bad_column.stderr
    no_key = await run_cli(
        "run", "--input", str(src), "--prompt", "{{ text }}", "--model", "gpt-4o-mini", "--provider", "openai",
        "--output", str(tmp_path / "o.parquet"), env={"OPENAI_API_KEY": ""},
    )
    assert no_key.returncode == 2 and "OPENAI_API_KEY" in no_key.stderr
    assert len(no_key.stderr.strip().splitlines()) <= 3


async def test_estimate_status_jobs_and_cancel(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(200)
    state = tmp_path / "state"
    est = await run_cli("estimate", "--input", str(src), "--prompt", PROMPT, "--model", "gpt-4o-mini", "--max-tokens", "30", "--rpm", "600", "--state-dir", str(state))
    assert est.returncode == 0, est.stderr
    assert "200" in est.stdout and "20.0 s" in est.stdout and "requests/min" in est.stdout

    async with Simulator(SimConfig(latency_s=0.05)) as sim:
        args = run_args(src, tmp_path / "o.parquet", state, sim.base_url, "--rpm", "600", "--chunk-size", "20")
        proc = await _start(args)
        await _wait_for_requests(sim, 20, proc)
        jobs = await run_cli("jobs", "--state-dir", str(state))
        job_id = re.search(r"\b([0-9a-f]{12})\b.*running", jobs.stdout).group(1)
        cancel = await run_cli("cancel", job_id, "--state-dir", str(state))
        assert "cancel requested" in cancel.stdout
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 5, err.decode()
    status = await run_cli("status", job_id, "--state-dir", str(state))
    assert "cancelled" in status.stdout
    assert int(re.search(r"requests ([\d,]+)", status.stdout).group(1).replace(",", "")) >= 20
    assert not (tmp_path / "o.parquet").exists()


def test_main_job_runs_on_the_builtin_simulator(tmp_path: Path) -> None:
    """The README's quickstart: the example job file on the built-in simulator, no API key."""
    import shutil
    import subprocess

    examples = Path(__file__).parent.parent / "examples"
    for name in ("job.toml", "reviews.csv", "sentiment.json"):
        shutil.copy(examples / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    done = subprocess.run([sys.executable, "-m", "backfill", "run", "job.toml", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "reviews-labelled.parquet")
    assert table.num_rows == 500
    assert set(table.column("sentiment").to_pylist()) <= {"positive", "negative", "neutral"}
    assert set(table.column("status").to_pylist()) == {"ok"}
