"""Shared fixtures: input tables, a job spec builder and the CLI as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def make_rows(n: int, start: int = 0) -> pa.Table:
    """`id` (unique strings) and `text`, so each answer can be traced to its row."""
    ids = [f"id-{i:06d}" for i in range(start, start + n)]
    texts = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5)) for i in range(start, start + n)]
    return pa.table({"id": ids, "text": texts})


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120) -> CliResult:
    """Run `python -m backfill ARGS` as a subprocess without blocking the loop (the simulator lives in it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backfill", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return CliResult(proc.returncode or 0, out.decode(), err.decode())


@pytest.fixture
def rows_parquet(tmp_path: Path):
    def write(n: int) -> Path:
        import pyarrow.parquet as pq

        path = tmp_path / f"rows-{n}.parquet"
        pq.write_table(make_rows(n), path, row_group_size=333)
        return path

    return write
