"""`--input -`: standard input is spooled to the state directory by content, so a re-run with the same piped
data resumes the same job; and the CLI end to end, from a pipe in to a pipe out."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import sys
from pathlib import Path

import pytest

from backfill.errors import SpecError
from backfill.io import open_source, spool_stdin
from backfill.sim import SimConfig, Simulator
from backfill.store import Store
from conftest import CliResult, make_rows

PROMPT = "Row {{ id }} says: {{ text }}"


def test_the_same_bytes_spool_to_the_same_file_and_other_bytes_to_another(tmp_path: Path) -> None:
    data = b"id,text\n" + b"".join(b"%d,row %d\n" % (i, i) for i in range(50_000))  # over one copy block
    first = spool_stdin(tmp_path, "csv", io.BytesIO(data))
    assert first.parent == tmp_path / "stdin" and first.suffix == ".csv"
    assert first.read_bytes() == data
    mtime = first.stat().st_mtime_ns
    again = spool_stdin(tmp_path, "CSV", io.BytesIO(data))
    assert again == first and again.stat().st_mtime_ns == mtime  # the mtime is part of the job's input fingerprint
    other = spool_stdin(tmp_path, "csv", io.BytesIO(data + b"50000,one more\n"))
    assert other != first
    assert sorted(p.name for p in (tmp_path / "stdin").iterdir()) == sorted([first.name, other.name])  # no temp files left


def test_a_compressed_stream_keeps_its_compression_suffix(tmp_path: Path) -> None:
    data = b"id,text\n1,one\n2,two\n"
    spooled = spool_stdin(tmp_path, "csv", io.BytesIO(gzip.compress(data)))
    assert spooled.name.endswith(".csv.gz")
    assert open_source(spooled, format="csv").head(5) == [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}]


def test_stdin_needs_a_format_and_some_data(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="pass --input-format csv, tsv, jsonl or parquet"):
        spool_stdin(tmp_path, None, io.BytesIO(b"id\n1\n"))
    with pytest.raises(SpecError, match="pass --input-format"):
        spool_stdin(tmp_path, "xlsx", io.BytesIO(b"id\n1\n"))
    with pytest.raises(SpecError, match="Standard input was empty"):
        spool_stdin(tmp_path, "jsonl", io.BytesIO(b""))
    assert list((tmp_path / "stdin").iterdir()) == []


async def _cli(*args: str, stdin: Path) -> CliResult:
    """The CLI as a real subprocess, its standard input read from a file as a pipe would feed it."""
    with stdin.open("rb") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backfill", *args, stdin=f,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    return CliResult(proc.returncode or 0, out.decode(), err.decode())


async def test_a_pipe_in_to_a_pipe_out_and_the_same_pipe_again_is_the_same_job(tmp_path: Path) -> None:
    src = tmp_path / "rows.csv"
    make_rows(60).to_pandas().to_csv(src, index=False)
    state = tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.001)) as sim:
        ran = await _cli(
            "run", "-i", "-", "--input-format", "csv", "--id-column", "id", "--prompt", PROMPT, "--model", "gpt-4o-mini",
            "--provider", "sim", "--base-url", sim.base_url, "--max-tokens", "20", "--chunk-size", "25",
            "--output", "-", "--state-dir", str(state), "--quiet", stdin=src,
        )
    assert ran.returncode == 0, ran.stderr
    rows = [json.loads(line) for line in ran.stdout.splitlines()]  # standard output holds the rows and nothing else
    assert [r["id"] for r in rows] == make_rows(60).column("id").to_pylist()
    assert all(r["output"].startswith(f"Answer to «Row {r['id']} says:") for r in rows)
    store = Store(state / "backfill.db")
    try:
        (job,) = store.list_jobs()
    finally:
        store.close()
    spooled = Path(job.spec["input"]["path"])
    assert spooled.parent == state / "stdin" and spooled.read_bytes() == src.read_bytes()
    # Piping the same bytes again spools to the same file, unchanged: the same input fingerprint, so the same job.
    with src.open("rb") as f:
        assert spool_stdin(state, "csv", f) == spooled
    assert open_source(spooled, format="csv").fingerprint() == job.input_fingerprint
