"""The Python entry point: `backfill.run(frame, prompt=..., model=..., schema=...)` returns a frame; `arun` is its async twin."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from backfill import engine, loop
from backfill.engine.runner import RunResult
from backfill.status import JobStatus, StopCause
from backfill.errors import BackfillError, BudgetExceeded, FatalProviderError
from backfill.progress import show_progress
from backfill.spec import JobSpec, from_options

ReturnType = Literal["pandas", "polars", "arrow", "path"]


def _spec(data: Any, options: dict[str, Any]) -> tuple[JobSpec, Any]:
    if isinstance(data, (str, Path)):
        return from_options(input=str(data), **options), None
    return from_options(**options), data


def _to_frame(table: pa.Table, return_type: ReturnType) -> Any:
    if return_type == "arrow":
        return table
    if return_type == "polars":
        import polars as pl

        return pl.from_arrow(table)
    return table.to_pandas()


def _raise_unless_done(result: RunResult) -> None:
    if result.status is JobStatus.SUCCEEDED:
        return
    if result.error is not None:
        raise BackfillError(f"Job {result.job_id} failed: {result.reason}") from result.error
    if result.status is JobStatus.FAILED:
        raise FatalProviderError(f"Job {result.job_id} failed: {result.reason}")
    if result.cause is StopCause.BUDGET:
        raise BudgetExceeded(f"Job {result.job_id} {result.reason}")
    raise BackfillError(f"Job {result.job_id} is {result.status}: {result.reason}. Call run again to resume it.")


async def arun(
    data: Any,
    *,
    prompt: str | None = None,
    model: str,
    schema: Any = None,
    return_type: ReturnType = "pandas",
    progress: bool | None = None,
    state_dir: str | Path | None = None,
    cache: bool = True,
    **options: Any,
) -> Any:
    """Run a job over `data` (a pandas/polars/arrow frame or a file path) and return the output as a frame.

    `return_type` is "pandas" (default), "polars", "arrow", or "path" to leave a large
    output on disk (give `output=...`) and get its path back.

    `options` are the job's settings by their flag names: system, messages, provider,
    base_url, api_key_env, kind, params, id_column, output, columns, rpm, tpm,
    max_in_flight, budget_usd, chunk_size, ... Calling again with the same arguments
    resumes the same job and pays for nothing already answered. `cache=False` does not
    reuse answers other jobs paid for.
    """
    spec, frame = _spec(data, dict(options, prompt=prompt, model=model, schema=schema))
    show = sys.stderr.isatty() or _in_notebook() if progress is None else progress
    tasks: list[asyncio.Task[None]] = []

    def on_start(runner: engine.JobRunner) -> None:
        if show:
            tasks.append(asyncio.create_task(show_progress(runner.stats)))

    try:
        result = await engine.run_job(spec, data=frame, state_dir=state_dir, on_start=on_start, use_cache=cache)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    _raise_unless_done(result)
    assert result.output_path is not None
    if return_type == "path":  # a big job: the output stays on disk
        return Path(result.output_path)
    return _to_frame(_read_output(result.output_path, spec.output.format), return_type)


def _read_output(path: str, format: str | None) -> pa.Table:
    from pyarrow import csv, json

    fmt = format or Path(path).suffix.lstrip(".")
    if fmt == "csv":
        return csv.read_csv(path)
    if fmt in ("jsonl", "ndjson"):
        return json.read_json(path)
    return pq.read_table(path)


def run(data: Any, **kwargs: Any) -> Any:
    """Synchronous `arun`; works inside a running event loop (a notebook) by running in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return loop.run(arun(data, **kwargs))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = loop.run(arun(data, **kwargs))
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules
