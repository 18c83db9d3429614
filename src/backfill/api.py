"""The Python entry point: `backfill.run(frame, prompt=..., model=..., schema=...)` returns a frame; `arun` is its async
twin, and `last_job()` the summary of the last run in this process."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from backfill import engine, loop
from backfill.engine.runner import RunResult
from backfill.errors import BackfillError, BudgetExceeded, FatalProviderError, Interrupted, SpecError
from backfill.io import output_format
from backfill.io.schema import JSON_TEXT_KEY
from backfill.progress import show_progress
from backfill.spec import STDIO, JobSpec, from_options
from backfill.status import JobStatus, StopCause
from backfill.summary import JobSummary, summarize

ReturnType = Literal["pandas", "polars", "arrow", "path"]
RETURN_TYPES: tuple[str, ...] = get_args(ReturnType)
# How often the caller's thread redraws a notebook's progress while the job runs in a thread of its own.
NOTEBOOK_REFRESH_S = 0.25

# The registry of one behind `last_job()`: the summary of the last run in this process, whatever its end.
_last: list[JobSummary] = []


def last_job() -> JobSummary | None:
    """The summary (rows ok, dead letters, requests, cost, output path) of the last `run` or `arun` in this
    process, or None before the first; kept whether the run succeeded or not."""
    return _last[-1] if _last else None


@dataclass
class _Live:
    """A run in progress as the caller's thread sees it: its loop and task, then its runner once started."""

    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[Any] | None = None
    runner: engine.JobRunner | None = None

    def interrupt(self, hard: bool) -> None:
        """Ctrl-C from the caller's thread: stop dispatching (at once when `hard`), or cancel a run not yet started."""
        if self.loop is None:
            return
        if self.runner is not None:
            self.loop.call_soon_threadsafe(_stop_interrupted, self.runner, hard)
        elif self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)


def _stop_interrupted(runner: engine.JobRunner, hard: bool) -> None:
    reason = f"interrupted; run `backfill resume {runner.plan.job_id}` or call run again to continue"
    runner.stop(JobStatus.PAUSED, reason, cause=StopCause.INTERRUPT, hard=hard)


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
    if result.cause is StopCause.INTERRUPT:
        raise Interrupted(
            f"Job {result.job_id} is paused (interrupted); answers so far are kept. "
            f"Run `backfill resume {result.job_id}` or call run again to continue."
        )
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
    output on disk (give `output=...`) and get its path back. The returned frame has the
    output's types (an id column of strings stays strings, whatever the output file's format).

    `options` are the job's settings by their flag names: system, messages, provider,
    base_url, api_key_env, kind, params, id_column, output, columns, rpm, tpm,
    max_in_flight, budget_usd, chunk_size, ... Calling again with the same arguments
    resumes the same job and pays for nothing already answered. `cache=False` does not
    reuse answers other jobs paid for. The run's summary is `backfill.last_job()`.
    """
    kwargs = dict(options, prompt=prompt, model=model, schema=schema, return_type=return_type, progress=progress, state_dir=state_dir, cache=cache)
    return await _arun(data, kwargs, _Live(), notebook_here=True)


def _progress_wanted(progress: bool | None) -> bool:
    return (sys.stderr.isatty() or _in_notebook()) if progress is None else progress


async def _arun(data: Any, kwargs: dict[str, Any], live: _Live, *, notebook_here: bool, signals: bool = False) -> Any:
    """`arun`'s body. `notebook_here`: draw a notebook's progress from this loop (else the caller's thread does)."""
    options = dict(kwargs)
    return_type = options.pop("return_type", "pandas")
    progress, state_dir, cache = options.pop("progress", None), options.pop("state_dir", None), options.pop("cache", True)
    if return_type not in RETURN_TYPES:
        raise SpecError(f"Unknown return_type {return_type!r}; use one of {', '.join(RETURN_TYPES)}.")
    if options.get("output") == STDIO:
        raise SpecError("output='-' (standard output) is for the command line; in Python, leave output out to get the frame back.")
    spec, frame = _spec(data, options)
    live.loop, live.task = asyncio.get_running_loop(), asyncio.current_task()
    show = _progress_wanted(progress)
    in_notebook = _in_notebook()
    tasks: list[asyncio.Task[None]] = []
    drawn: list[Callable[[JobSummary | None], None]] = []

    def on_start(runner: engine.JobRunner) -> None:
        live.runner = runner
        if not show:
            return
        if not in_notebook:
            tasks.append(asyncio.create_task(show_progress(runner.stats)))
        elif notebook_here:
            from backfill.progress.notebook import NotebookProgress

            board = NotebookProgress(runner.stats)
            tasks.append(asyncio.create_task(_redraw(board.update)))
            drawn.append(board.finish)

    try:
        result = await engine.run_job(spec, data=frame, state_dir=state_dir, on_start=on_start, use_cache=cache, handle_signals=signals)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    summary = _summary(result, state_dir)
    for finish in drawn:
        finish(summary)
    _raise_unless_done(result)
    assert result.output_path is not None and live.runner is not None
    if return_type == "path":  # a big job: the output stays on disk
        return Path(result.output_path)
    return _to_frame(_read_output(result.output_path, spec.output.format, live.runner.plan.output_schema), return_type)


async def _redraw(update: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(NOTEBOOK_REFRESH_S)
        update()


def _summary(result: RunResult, state_dir: str | Path | None) -> JobSummary:
    """The run's summary by the ledger's record, kept for `last_job()`."""
    store = engine.open_store(state_dir)
    try:
        record = store.get_job(result.job_id)
    finally:
        store.close()
    summary = summarize(result, record)
    _last[:] = [summary]
    return summary


def _read_output(path: str, format: str | None, schema: pa.Schema) -> pa.Table:
    """The output file as a table of the output schema: CSV and JSONL carry no types, so they are read with the
    plan's (a CSV reader would turn the id "007" into the integer 7)."""
    fmt = output_format(path, format)
    if fmt == "csv":
        return _read_csv(path, schema)
    if fmt == "jsonl":
        return _read_jsonl(path, schema)
    return pq.read_table(path, schema=schema)


def _read_csv(path: str, schema: pa.Schema) -> pa.Table:
    from pyarrow import csv

    # Nested values (embedding vectors, lists) were written as JSON text.
    nested = {f.name for f in schema if pa.types.is_nested(f.type)}
    types = {f.name: pa.string() if f.name in nested else f.type for f in schema}
    table = csv.read_csv(
        path, convert_options=csv.ConvertOptions(column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False)
    )
    for name in nested:
        values = [None if v is None else json.loads(v) for v in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=schema.field(name).type))
    return table.select(schema.names).cast(schema)


def _read_jsonl(path: str, schema: pa.Schema) -> pa.Table:
    from pyarrow import json as pjson

    # Answers kept as JSON text were written as JSON values: read them as such, then back to text.
    as_text = {f.name for f in schema if f.metadata and f.metadata.get(JSON_TEXT_KEY)}
    explicit = pa.schema([f for f in schema if f.name not in as_text])
    table = pjson.read_json(path, parse_options=pjson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="infer"))
    for name in as_text:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
            continue
        values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in table.column(name).to_pylist()]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type=pa.string()))
    return table.select(schema.names).cast(schema)


def run(data: Any, **kwargs: Any) -> Any:
    """Synchronous `arun`; inside a running event loop (a notebook) the job runs in a thread of its own.

    Ctrl-C (or a notebook's interrupt) pauses the job: answers in flight are awaited and kept, and
    `Interrupted` says how to continue; a second Ctrl-C stops at once."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        runs = _run_here
    else:
        runs = _run_in_thread
    try:
        return runs(data, kwargs)
    except Interrupted as e:  # one line to read, not the event loop's frames
        raise e.with_traceback(None) from None


def _run_here(data: Any, kwargs: dict[str, Any]) -> Any:
    live = _Live()
    # The loop's own Ctrl-C handler stops the job gracefully; it can only be installed in the main thread.
    signals = threading.current_thread() is threading.main_thread()
    try:
        return loop.run(_arun(data, kwargs, live, notebook_here=True, signals=signals))
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise _interrupted(live) from None


def _interrupted(live: _Live) -> Interrupted:
    if live.runner is None:
        return Interrupted("Interrupted before the job started; nothing was sent.")
    job = live.runner.plan.job_id
    return Interrupted(f"Job {job} is paused (interrupted); answers so far are kept. Run `backfill resume {job}` or call run again to continue.")


def _run_in_thread(data: Any, kwargs: dict[str, Any]) -> Any:
    live = _Live()
    box: dict[str, Any] = {}
    # Waited on instead of the thread: a KeyboardInterrupt inside Thread.join can leave is_alive() False
    # while the thread still runs (CPython issue 90882).
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = loop.run(_arun(data, kwargs, live, notebook_here=False))
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    notebook = _in_notebook() and _progress_wanted(kwargs.get("progress"))
    board = None
    interrupts = 0
    thread = threading.Thread(target=target, name="backfill-run", daemon=True)
    thread.start()
    while not done.is_set():
        try:
            done.wait(NOTEBOOK_REFRESH_S)
            # IPython's display is driven from the caller's thread: output from another thread may land in another cell.
            if notebook and board is None and live.runner is not None:
                from backfill.progress.notebook import NotebookProgress

                board = NotebookProgress(live.runner.stats)
            elif board is not None:
                board.update()
        except KeyboardInterrupt:
            interrupts += 1
            live.interrupt(hard=interrupts > 1)
    thread.join()
    if board is not None:
        board.finish(last_job())
    error = box.get("error")
    if isinstance(error, asyncio.CancelledError):
        raise _interrupted(live) from None
    if error is not None:
        raise error
    return box["value"]


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules
