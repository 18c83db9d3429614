"""The command line: `backfill run / estimate / status / jobs / resume / cancel / models / cache / sim / serve`, thin over the engine.

Exit codes: 0 the job succeeded (rows may be dead letters), 1 unexpected error,
2 the spec is wrong (nothing was sent), 3 the provider refused the job (bad key,
unknown model, quota), 4 the budget stopped it, 5 cancelled, 6 another process is
running the job, 130 interrupted or paused.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from backfill import engine, loop, options
from backfill.cost import PriceTable, price_list
from backfill.durations import parse_duration
from backfill.engine.plan import key_endpoint, mode_key
from backfill.engine.runner import RunResult
from backfill.errors import BackfillError, SpecError
from backfill.inspect import requests_command
from backfill.progress import show_progress
from backfill.server.cli import credentials_app, serve_command, users_app
from backfill.sim.cli import sim_command
from backfill.spec import STDIO, JobSpec, build_spec, from_options
from backfill.status import JobStatus, StopCause
from backfill.store.sqlite import JobRecord
from backfill.summary import JobSummary, summarize
from backfill.tokens import is_exact

app = typer.Typer(
    add_completion=True, no_args_is_help=True,
    help="Push a table through an LLM under rate limits — resumable, exactly once.",
)
app.command("sim", help="Run the provider simulator (OpenAI and Anthropic protocols) on a local port.")(sim_command)
app.command("requests", help="What was sent for a row and what came back (re-rendered from the spec and the input).")(requests_command)
app.command("serve", help="Run the shared service: HTTP API, dashboard, workers.")(serve_command)
app.add_typer(users_app, name="users", help="Users of the shared service and their API tokens.")
app.add_typer(credentials_app, name="credentials", help="Provider credentials of the shared service, their grants and the secret key.")
out = Console()
err = Console(stderr=True)

EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_FATAL, EXIT_BUDGET, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

StateDir = typer.Option(None, "--state-dir", help="Where the ledger lives.", show_default="./.backfill", envvar="BACKFILL_STATE_DIR")
AsJson = typer.Option(False, "--json", help="Print one JSON object on standard output instead of text.")
# How a run that stopped early exits, by its stop cause.
_EXIT_BY_CAUSE = {
    StopCause.BUDGET: EXIT_BUDGET, StopCause.CANCEL: EXIT_CANCELLED, StopCause.QUOTA: EXIT_FATAL, StopCause.FATAL: EXIT_FATAL,
}
RUN_EXAMPLE = (
    "Example: backfill run -i reviews.parquet --id-column review_id -p 'Sentiment of: {{ text }}' "
    "-m gpt-4o-mini -o out.parquet --budget-usd 5"
)


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("backfill")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "unknown"
        out.print(f"backfill {version}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", help="Show the version and exit.", callback=_version, is_eager=True),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs (also accepted after the command)."),
) -> None:
    """Options of every command."""
    # `--debug` is taken out of argv by main() wherever it stands; declared here so the help lists it.


@dataclass(frozen=True)
class RunSettings:
    """How one run behaves (the options table's run settings); never part of the job."""

    state_dir: Path | None = None
    quiet: bool = False
    no_cache: bool = False
    wait: bool = False
    force: bool = False
    log_every_s: float = 30.0
    log_format: str = "text"
    as_json: bool = False

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RunSettings:
        return cls(
            state_dir=values.get("state_dir"), quiet=bool(values.get("quiet")), no_cache=bool(values.get("no_cache")),
            wait=bool(values.get("wait")), force=bool(values.get("force")),
            log_every_s=parse_duration(values.get("log_every") or "30s"), log_format=values.get("log_format") or "text",
            as_json=bool(values.get("as_json")),
        )


def _spec_from_values(values: dict[str, Any], state_dir: Path | None) -> JobSpec:
    """A command's spec options → JobSpec; `-i -` is spooled to the state directory first, so resume can re-read it."""
    if values.get("input") == STDIO:
        if not values.get("input_format"):
            raise SpecError("Reading from standard input (-i -) needs --input-format (parquet, csv or jsonl).")
        from backfill.io.stdio import spool_stdin

        values = dict(values, input=str(spool_stdin(engine.store_path(state_dir).parent, values["input_format"])))
    return from_options(**values)


@app.command(epilog=RUN_EXAMPLE)
@options.with_options(options.RUN_CMD)
def run(**values: Any) -> None:
    """Run a prompt over every row of a table. Re-running the same command resumes the same job."""
    spec_values, run_values = options.split(values)
    settings = RunSettings.from_values(run_values)
    spec = _spec_from_values(spec_values, settings.state_dir)
    if not spec.output.path:
        raise SpecError("Job spec field 'output.path': no output given; pass --output FILE (or - for standard output).")
    _run_and_report(spec, settings)


def _run_and_report(spec: JobSpec, settings: RunSettings) -> None:
    before: list[JobRecord] = []
    result = loop.run(_run(spec, settings, before))
    if result.error is not None:
        logging.getLogger("backfill").debug("the job's error", exc_info=result.error)
    store = engine.open_store(settings.state_dir)
    try:
        record = store.get_job(result.job_id)
    finally:
        store.close()
    summary = summarize(result, record)
    was_complete = bool(before) and before[0].status is JobStatus.SUCCEEDED and result.stats.requests_sent == 0
    if settings.as_json:
        # Rows go to standard output with `-o -`; the summary must not mix with them.
        stream = sys.stderr if spec.output.path == STDIO else sys.stdout
        stream.write(json.dumps(summary.to_dict()) + "\n")
        stream.flush()
    elif was_complete and result.status is JobStatus.SUCCEEDED:
        err.print(_complete_text(summary), highlight=False, soft_wrap=True)
    else:
        err.print(summary.text(), highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code(result))


def _complete_text(summary: JobSummary) -> str:
    where = f"; its output is {summary.output}" if summary.output else ""
    return (
        f"job {summary.job_id} is already complete: {summary.rows_ok:,} rows ok, {summary.rows_failed:,} dead letters "
        f"of {summary.rows_total:,}{where}. Nothing was sent."
    )


def exit_code(result: RunResult) -> int:
    if result.status is JobStatus.SUCCEEDED:
        return EXIT_OK
    if result.error is not None:
        return EXIT_ERROR
    return _EXIT_BY_CAUSE.get(result.cause, EXIT_INTERRUPTED) if result.cause else EXIT_FATAL


def _check_cancelled(record: JobRecord, force: bool) -> None:
    if record.status is JobStatus.CANCELLED and not force:
        raise SpecError(f"Job {record.id} was cancelled; pass --force to run it again (answers already paid for are kept).")


async def _run(spec: JobSpec, settings: RunSettings, before: list[JobRecord]) -> RunResult:
    progress: list[asyncio.Task[None]] = []

    def on_start(runner: engine.JobRunner) -> None:
        # The job's record as this run found it: a re-run says it resumes, or that the job is complete.
        record = runner.store.get_job(runner.plan.job_id)
        if record is not None:
            _check_cancelled(record, settings.force)
            before.append(record)
            left = max(0, runner.plan.rows_total - record.rows_done)
            if record.status is not JobStatus.SUCCEEDED and record.rows_done:
                err.print(f"resuming job {record.id}: {record.rows_done:,} rows already answered, {left:,} left", highlight=False, soft_wrap=True)
        if not settings.quiet:
            progress.append(asyncio.create_task(
                show_progress(runner.stats, err, log_every_s=settings.log_every_s, log_format=settings.log_format)
            ))

    try:
        return await engine.run_job(
            spec, state_dir=settings.state_dir, on_start=on_start, handle_signals=True,
            use_cache=not settings.no_cache, wait=settings.wait,
        )
    finally:
        for t in progress:
            t.cancel()
        await asyncio.gather(*progress, return_exceptions=True)


@app.command()
@options.with_options(options.ESTIMATE_CMD)
def estimate(**values: Any) -> None:
    """Rows, input tokens, expected output tokens, cost and the shortest duration — sending nothing."""
    spec_values, run_values = options.split(values)
    state_dir = run_values.get("state_dir")
    spec = _spec_from_values(spec_values, state_dir)
    store = engine.open_store(state_dir)
    try:
        plan = engine.make_plan(spec, store=store)
        est = engine.estimate(plan, store, run_values.get("expected_output_tokens"))
    finally:
        store.close()
    if run_values.get("as_json"):
        priced = plan.price is not None
        _print_json({
            "job_id": plan.job_id, "model": spec.task.model, "rows": est.rows, "rows_cached": est.rows_cached,
            "rows_failing": est.rows_failing, "requests": est.requests, "input_tokens": est.input_tokens,
            "input_tokens_exact": is_exact(spec.task.model), "expected_output_tokens": est.expected_output_tokens,
            "expected_output_per_row": est.expected_output_per_row, "expected_output_source": est.expected_output_source,
            "cost_usd": est.cost_usd if priced else None,
            "worst_case_cost_usd": est.worst_case_cost_usd if priced and not plan.is_embedding else None,
            "min_duration_s": est.min_duration_s, "bound_by": est.bound_by,
        })
        return
    table = Table(title=f"estimate for {spec.task.model}", show_header=False)
    table.add_row("job", plan.job_id)
    table.add_row("rows", f"{est.rows:,}")
    table.add_row("already answered (free)", f"{est.rows_cached:,}")
    table.add_row("rows the template fails on", f"{est.rows_failing:,}")
    table.add_row("requests", f"{est.requests:,}")
    table.add_row("input tokens (exact)" if is_exact(spec.task.model) else "input tokens (estimate)", f"{est.input_tokens:,}")
    table.add_row(
        f"expected output tokens ({est.expected_output_source})",
        f"{est.expected_output_tokens:,} ({est.expected_output_per_row:,} a row)",
    )
    table.add_row("cost (expected)", "unpriced model" if plan.price is None else f"${est.cost_usd:,.4f}")
    if not plan.is_embedding:
        at = f"max_tokens={est.max_tokens:,}" if est.max_tokens else f"max_tokens unset, {engine.plan.UNSET_MAX_TOKENS_RESERVE:,} reserved"
        table.add_row(f"cost (worst case at {at})", "unpriced model" if plan.price is None else f"${est.worst_case_cost_usd:,.4f}")
    if est.min_duration_s is None:
        table.add_row("shortest duration", "unknown: no limits given (they are learned at run time)")
    else:
        table.add_row("shortest duration", f"{_duration(est.min_duration_s)} (bound by {est.bound_by})")
    out.print(table)


def _print_json(value: Any) -> None:
    """One JSON object on one line of standard output (never wrapped, whatever the terminal's width)."""
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


_RESUME_EXTRA = (
    inspect.Parameter("job", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Argument(..., help="Job id (a unique prefix is enough).", show_default=False)),
    inspect.Parameter("budget_usd", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[float], default=typer.Option(None, "--budget-usd", help="A new budget in USD (e.g. higher, after a budget stop).", show_default="the job's")),
    inspect.Parameter("allow_partial", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(False, "--allow-partial", help="Start even if the estimate exceeds the budget; stop at it.")),
)


@app.command()
@options.with_options(options.RESUME_CMD, extra=_RESUME_EXTRA)
def resume(**values: Any) -> None:
    """Continue a job that stopped; answers that already arrived are not paid for again."""
    settings = RunSettings.from_values(values)
    store = engine.open_store(settings.state_dir)
    try:
        record = store.find_job(values["job"])
    finally:
        store.close()
    _check_cancelled(record, settings.force)
    data = record.spec
    if not data.get("input", {}).get("path"):
        raise BackfillError(f"Job {record.id} read a frame from Python; resume it by calling backfill.run again with the same frame.")
    if values.get("budget_usd") is not None:
        data["budget"]["usd"] = values["budget_usd"]
    if values.get("allow_partial"):
        data["budget"]["allow_partial"] = True
    _run_and_report(build_spec(data), settings)


def _rows_text(rec: JobRecord) -> str:
    """Rows as the run summary counts them: committed to the ledger (answers in flight are not yet counted)."""
    text = f"rows ok {rec.rows_ok:,}, dead letters {rec.rows_failed:,} of {rec.rows_total or 0:,} (committed)"
    # The running process writes its live count with each heartbeat (every few seconds).
    if rec.status is JobStatus.RUNNING and rec.rows_answered > rec.rows_done:
        text += f"; {rec.rows_answered - rec.rows_done:,} more answered, not yet committed"
    return text


def _job_dict(rec: JobRecord) -> dict[str, Any]:
    """A job's record by the same field names as `run --json`'s summary."""
    return {
        "job_id": rec.id, "status": rec.status.value, "stop_cause": rec.stop_cause.value if rec.stop_cause else None,
        "reason": rec.reason, "model": rec.spec["task"]["model"], "input": rec.spec["input"].get("path"),
        "output": rec.spec["output"].get("path"), "rows_total": rec.rows_total or 0, "rows_ok": rec.rows_ok,
        "rows_failed": rec.rows_failed, "rows_answered": max(rec.rows_answered, rec.rows_done), "requests": rec.requests, "rate_limited": rec.rate_limited,
        "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens, "cost_usd": rec.spent_usd,
        "lease_holder": rec.lease_holder, "updated": rec.updated,
    }


@app.command()
def status(
    job: str = typer.Argument(..., help="Job id (a unique prefix is enough).", show_default=False),
    state_dir: Optional[Path] = StateDir,
    as_json: bool = AsJson,
) -> None:
    """One job: status, rows, spend, dead letters and its latest events."""
    store = engine.open_store(state_dir)
    try:
        rec = store.find_job(job)
        dead = store.dead_letters(rec.id, limit=10)
        events = store.events(rec.id)[-5:]
        task = rec.spec["task"]
        endpoint = key_endpoint(task["provider"], task.get("base_url"))
        mode = store.get_structured_mode(mode_key(task["provider"], task.get("base_url")), task["model"]) if task.get("schema") else None
    finally:
        store.close()
    if as_json:
        _print_json({
            **_job_dict(rec), "structured_mode": mode,
            "dead_letters": [{"row_id": d.row_id, "reason": d.reason} for d in dead],
        })
        return
    cause = f" ({rec.stop_cause})" if rec.stop_cause else ""
    out.print(f"[bold]job {rec.id}[/bold]  {rec.status}{cause}" + (f" — {rec.reason}" if rec.reason else ""), highlight=False)
    out.print(f"  model {task['model']} via {task['provider']}; input {rec.spec['input'].get('path')}; output {rec.spec['output'].get('path')}", highlight=False)
    if rec.status is JobStatus.RUNNING and rec.lease_holder:
        out.print(f"  running in process {rec.lease_holder}", highlight=False)
    if mode is not None:
        out.print(f"  structured output sent as {mode} (what {endpoint} accepts)", highlight=False)
    out.print(f"  {_rows_text(rec)}", highlight=False)
    out.print(f"  requests {rec.requests:,} (429s {rec.rate_limited:,}); tokens in {rec.input_tokens:,}, out {rec.output_tokens:,}; spent ${rec.spent_usd:.4f}")
    for d in dead:
        out.print(f"  dead letter {d.row_id}: {d.reason}", highlight=False)
    for at, kind_, message in events:
        what = kind_ if message == kind_ else f"{kind_}: {message}"  # a status change without a reason names itself once
        out.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))} {what}", highlight=False)


def _short(path: str | None) -> str:
    """A path as `jobs` shows it: the file name (the whole path is in `status`)."""
    return Path(path).name if path and path != STDIO else (path or "(frame)")


def _jobs_lines(records: list[JobRecord]) -> list[str]:
    """Two lines a job: id, status, rows, spend and model; then its input → output, so that any width shows whole ids."""
    head = ("job", "status", "rows ok/total", "spent", "model")
    cells = [head] + [
        (
            r.id, r.status + (f" ({r.stop_cause})" if r.stop_cause else ""),
            f"{r.rows_ok:,}/{r.rows_total or 0:,}" + (f" ({r.rows_failed:,} failed)" if r.rows_failed else ""),
            f"${r.spent_usd:.4f}", r.spec["task"]["model"],
        )
        for r in records
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for n, c in enumerate(cells):
        lines.append(f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]:>{widths[3]}}  {c[4]}")
        if n:
            r = records[n - 1]
            lines.append(f"{'':{widths[0]}}  {_short(r.spec['input'].get('path'))} → {_short(r.spec['output'].get('path'))}")
    return lines


@app.command()
def jobs(
    state_dir: Optional[Path] = StateDir,
    limit: int = typer.Option(50, "--limit", help="Show at most this many jobs.", show_default=True),
    as_json: bool = AsJson,
) -> None:
    """The jobs in this state directory, newest first; rows are those committed to the ledger."""
    store = engine.open_store(state_dir)
    try:
        records = store.list_jobs(limit=limit)
    finally:
        store.close()
    if as_json:
        _print_json({"jobs": [_job_dict(r) for r in records]})
        return
    for line in _jobs_lines(records):
        out.print(line, highlight=False, markup=False)


@app.command()
def cancel(job: str = typer.Argument(..., help="Job id (a unique prefix is enough).", show_default=False), state_dir: Optional[Path] = StateDir) -> None:
    """Cancel a job; a running one stops within a second, keeping what is already written."""
    store = engine.open_store(state_dir)
    try:
        rec = store.find_job(job)
        if rec.status == JobStatus.RUNNING:
            store.request(rec.id, "cancel")
            out.print(f"job {rec.id}: cancel requested")
        elif rec.status in (JobStatus.SUCCEEDED, JobStatus.CANCELLED):
            out.print(f"job {rec.id} is already {rec.status}")
        else:
            store.set_status(rec.id, JobStatus.CANCELLED, "cancelled by request", StopCause.CANCEL)
            out.print(f"job {rec.id}: cancelled")
    finally:
        store.close()


@app.command()
def models(as_json: bool = AsJson) -> None:
    """The models in the built-in price table: USD per 1M tokens and context sizes (override them in a job file or with --price-input/--price-output)."""
    rows = price_list(PriceTable.builtin())
    if as_json:
        _print_json({"models": [r.to_dict() for r in rows]})
        return
    table = Table("model", "input $/1M", "cached input", "output $/1M", "batch", "context", "max output", box=None, pad_edge=False)
    for r in rows:
        table.add_row(
            r.model, f"{r.input:g}", "—" if r.cached_input is None else f"{r.cached_input:g}", f"{r.output:g}",
            f"-{r.batch_discount:.0%}" if r.batch_discount else "—", _tokens(r.context_tokens), _tokens(r.max_output_tokens),
        )
    out.print(table)


def _tokens(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n:,}"


cache_app = typer.Typer(no_args_is_help=True, help="The response cache: answers paid for once, reused by identical requests.")
app.add_typer(cache_app, name="cache")

@cache_app.command("clear")
def cache_clear(
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Only answers older than this: 500ms, 30s, 10m, 6h, 7d or seconds.", show_default="any age"),
    job: Optional[str] = typer.Option(None, "--job", help="Only answers paid for by this job (a unique id prefix is enough).", show_default="any job"),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """Delete cached answers (all of them, or those older than a duration or of one job)."""
    seconds = parse_duration(older_than) if older_than else None
    store = engine.open_store(state_dir)
    try:
        job_id = store.find_job(job).id if job else None
        n = store.clear_cache(older_than_s=seconds, job_id=job_id)
    finally:
        store.close()
    out.print(f"removed {n:,} cached answer(s)", highlight=False)


def main() -> None:
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(standalone_mode=False)
    except BackfillError as e:
        if debug:
            raise
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # click's usage errors know how to show themselves
        show = getattr(e, "show", None)
        if show is not None and not debug:
            show()
            sys.exit(getattr(e, "exit_code", EXIT_SPEC))
        if debug:
            raise
        err.print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", highlight=False, markup=False)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)
