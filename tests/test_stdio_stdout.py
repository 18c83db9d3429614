"""`--output -`: rows go to standard output as JSON Lines as their chunks commit, in chunk order; a re-run
emits every committed row again from the first chunk, so the run that completes the job prints the whole table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill import engine
from backfill.errors import BackfillError, SpecError
from backfill.io import StdoutSink
from backfill.sim import SimConfig, Simulator
from backfill.spec import build_spec
from backfill.status import JobStatus, StopCause
from conftest import make_rows

PROMPT = "Row {{ id }} says: {{ text }}"
ROWS, CHUNK = 300, 25


def _spec(src: Path, base_url: str, output: str, **output_extra: Any) -> Any:
    return build_spec({
        "input": {"path": str(src), "id_column": "id"},
        "task": {"model": "gpt-4o-mini", "provider": "sim", "base_url": base_url, "prompt": PROMPT, "params": {"max_tokens": 20}},
        "output": {"path": output, "columns": ["text"], **output_extra},
        "limits": {"max_in_flight": 50},
        "chunk_size": CHUNK,
    })


def _lines(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.decode().splitlines()]


def _stop_after(rows: int):
    """An on_start hook that pauses the job (as Ctrl-C does) once `rows` rows are settled."""
    tasks: list[asyncio.Task[None]] = []

    def on_start(runner: engine.JobRunner) -> None:
        async def watch() -> None:
            while runner.stats.rows_done < rows:
                await asyncio.sleep(0.005)
            runner.stop(JobStatus.PAUSED, "stopped by the test", cause=StopCause.INTERRUPT)

        tasks.append(asyncio.create_task(watch()))

    return on_start


async def test_stdout_gets_every_row_once_in_order_across_a_stop_and_two_reruns(
    tmp_path: Path, rows_parquet, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    src = rows_parquet(ROWS)
    ids = make_rows(ROWS).column("id").to_pylist()
    state = tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.005)) as sim:
        spec = _spec(src, sim.base_url, "-")
        first = await engine.run_job(spec, state_dir=state, on_start=_stop_after(75))
        stopped = _lines(capfdbinary.readouterr().out)
        second = await engine.run_job(spec, state_dir=state)
        completed = _lines(capfdbinary.readouterr().out)
        (part,) = state.glob("jobs/*/part-000000002.parquet")
        part.unlink()  # lost since: rebuilt from the ledger's answers, for free
        third = await engine.run_job(spec, state_dir=state)
        again = _lines(capfdbinary.readouterr().out)
        as_file = await engine.run_job(_spec(src, sim.base_url, str(tmp_path / "o.jsonl")), state_dir=state)
    assert first.status is JobStatus.PAUSED and second.status is third.status is JobStatus.SUCCEEDED
    # The stopped run printed whole chunks from the first on, in order, and not all of them.
    assert 0 < len(stopped) < ROWS and len(stopped) % CHUNK == 0
    assert [r["id"] for r in stopped] == ids[: len(stopped)]
    # The run that completed the job printed the whole table, each row once, in input order, each its own answer.
    assert [r["id"] for r in completed] == ids
    assert all(r["status"] == "ok" and r["output"].startswith(f"Answer to «Row {r['id']} says:") for r in completed)
    assert first.stats.requests_sent + second.stats.requests_sent == ROWS  # nothing paid for twice
    # A re-run of the completed job prints the same table again and sends nothing, even with a part lost.
    assert third.stats.requests_sent == 0
    assert [(r["id"], r["output"]) for r in again] == [(r["id"], r["output"]) for r in completed]
    # Standard output carries what a .jsonl output file holds.
    assert as_file.output_path is not None
    file_rows = [json.loads(line) for line in Path(as_file.output_path).read_text().splitlines()]
    assert [(r["id"], r["text"], r["output"]) for r in file_rows] == [(r["id"], r["text"], r["output"]) for r in completed]
    assert third.output_path == "-"


async def test_stdout_takes_jsonl_only(tmp_path: Path, rows_parquet) -> None:
    spec = _spec(rows_parquet(10), "http://127.0.0.1:9/v1", "-", format="csv")
    with pytest.raises(SpecError, match=r"Standard output \(--output -\) takes JSON Lines only"):
        engine.make_plan(spec)


class _ClosedPipe:
    def write(self, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_is_one_sentence(tmp_path: Path) -> None:
    schema = pa.schema([("row_id", pa.int64()), ("output", pa.string())])
    sink = StdoutSink(parts_dir=tmp_path, schema=schema, stream=_ClosedPipe())  # type: ignore[arg-type]
    sink.write_chunk(0, pa.table({"row_id": [0, 1], "output": ["a", "b"]}, schema=schema))
    with pytest.raises(BackfillError, match="Standard output was closed before all rows were written"):
        sink.committed([0])
    assert pq.read_table(sink.part_path(0)).num_rows == 2  # the rows stay for the next run
