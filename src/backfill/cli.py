"""The command line: `backfill run / estimate / status / jobs / resume / cancel / sim`, thin over the engine.

Exit codes: 0 the job succeeded (rows may be dead letters), 1 unexpected error,
2 the spec is wrong (nothing was sent), 3 the provider refused the job (bad key,
unknown model, quota), 4 the budget stopped it, 5 cancelled, 6 another process is
running the job, 130 interrupted or paused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from backfill import engine, loop
from backfill.engine.plan import key_endpoint, mode_key
from backfill.engine.runner import RunResult
from backfill.errors import BackfillError, SpecError
from backfill.progress import show_progress
from backfill.server.cli import serve_command, users_app
from backfill.sim.cli import sim_command
from backfill.spec import JobSpec, build_spec, from_options
from backfill.status import JobStatus, StopCause
from backfill.tokens import is_exact

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Push a table through an LLM under rate limits — resumable, exactly once.")
app.command("sim", help="Run the provider simulator (OpenAI and Anthropic protocols) on a local port.")(sim_command)
app.command("serve", help="Run the shared service: HTTP API, dashboard, workers.")(serve_command)
app.add_typer(users_app, name="users", help="Users of the shared service and their API tokens.")
out = Console()
err = Console(stderr=True)

EXIT_OK, EXIT_ERROR, EXIT_SPEC, EXIT_FATAL, EXIT_BUDGET, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130

StateDir = typer.Option(None, "--state-dir", help="Where the ledger lives (default ./.backfill).", envvar="BACKFILL_STATE_DIR")
NoCache = typer.Option(False, "--no-cache", help="Do not reuse answers other jobs paid for (this job's own are always kept).")
Wait = typer.Option(False, "--wait", help="If another process is running the job, wait for it instead of exiting (code 6).")
# How a run that stopped early exits, by its stop cause.
_EXIT_BY_CAUSE = {
    StopCause.BUDGET: EXIT_BUDGET, StopCause.CANCEL: EXIT_CANCELLED, StopCause.QUOTA: EXIT_FATAL, StopCause.FATAL: EXIT_FATAL,
}


def _spec_from_flags(job_file: Optional[Path], **flags: Any) -> JobSpec:
    params = {k: v for k, v in (("max_tokens", flags.pop("max_tokens")), ("temperature", flags.pop("temperature")), ("seed", flags.pop("seed")), ("top_p", flags.pop("top_p"))) if v is not None}
    columns = flags.pop("columns")
    return from_options(
        job_file=job_file,
        params=params,
        columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None,
        **flags,
    )


@app.command()
def run(
    job_file: Optional[Path] = typer.Argument(None, help="A job file (TOML or YAML); flags override it."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Parquet, CSV or JSONL file."),
    input_format: Optional[str] = typer.Option(None, "--input-format"),
    input_encoding: Optional[str] = typer.Option(None, "--input-encoding", help="Text encoding of a CSV or JSONL input (default utf-8)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Column with the row id (default: row position)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="User message template, e.g. 'Classify: {{ text }}'."),
    system: Optional[str] = typer.Option(None, "--system", help="System message template."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    provider: Optional[str] = typer.Option(None, "--provider", help="sim (default), openai, azure or anthropic."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Variable holding the API key."),
    kind: Optional[str] = typer.Option(None, "--kind", help="chat (default) or embedding."),
    schema: Optional[str] = typer.Option(None, "--schema", help="JSON Schema file of the output; its fields become columns."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output file (.parquet, .csv, .jsonl)."),
    output_format: Optional[str] = typer.Option(None, "--output-format"),
    if_exists: Optional[str] = typer.Option(None, "--if-exists", help="When the output file exists: fail (default) or replace."),
    columns: Optional[str] = typer.Option(None, "--columns", help="Input columns to pass through, comma-separated."),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="Requests/min (learned from headers if omitted)."),
    tpm: Optional[float] = typer.Option(None, "--tpm", help="Tokens/min."),
    input_tpm: Optional[float] = typer.Option(None, "--input-tpm"),
    output_tpm: Optional[float] = typer.Option(None, "--output-tpm"),
    max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    max_attempts: Optional[int] = typer.Option(None, "--max-attempts"),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="Spending never passes this."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Start even if the estimate exceeds the budget."),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size"),
    timeout_s: Optional[float] = typer.Option(None, "--timeout", help="Seconds per request."),
    context_tokens: Optional[int] = typer.Option(None, "--context-tokens", help="Tokens the model accepts (default: built-in table)."),
    state_dir: Optional[Path] = StateDir,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    no_cache: bool = NoCache,
    wait: bool = Wait,
) -> None:
    """Run a prompt over every row of a table. Re-running the same command resumes the same job."""
    spec = _spec_from_flags(
        job_file,
        input=input, input_format=input_format, input_encoding=input_encoding, id_column=id_column, prompt=prompt,
        system=system, model=model, provider=provider, base_url=base_url, api_key_env=api_key_env, kind=kind,
        schema=schema, output=output, output_format=output_format, if_exists=if_exists, columns=columns, rpm=rpm, tpm=tpm, input_tpm=input_tpm, output_tpm=output_tpm,
        max_in_flight=max_in_flight, max_tokens=max_tokens, temperature=temperature, seed=seed, top_p=top_p,
        max_attempts=max_attempts, budget_usd=budget_usd, allow_partial=allow_partial or None, chunk_size=chunk_size,
        timeout_s=timeout_s, context_tokens=context_tokens,
    )
    if not spec.output.path:
        raise SpecError("Job spec field 'output.path': no output given; pass --output FILE.")
    _run_and_report(spec, state_dir, quiet, use_cache=not no_cache, wait=wait)


def _run_and_report(spec: JobSpec, state_dir: Optional[Path], quiet: bool, *, use_cache: bool = True, wait: bool = False) -> None:
    result = loop.run(_run(spec, state_dir, quiet, use_cache=use_cache, wait=wait))
    if result.error is not None:
        logging.getLogger("backfill").debug("the job's error", exc_info=result.error)
    s = result.stats
    # Rows and spend as the ledger holds them (the one truth); this run's own counts beside them.
    store = engine.open_store(state_dir)
    try:
        job = store.get_job(result.job_id)
    finally:
        store.close()
    ok, failed, spent = (job.rows_ok, job.rows_failed, job.spent_usd) if job else (s.rows_ok, s.rows_failed, s.cost_usd)
    summary = (
        f"job {result.job_id}: {result.status}" + (f" — {result.reason}" if result.reason else "")
        + f"\n  rows ok {ok:,}, failed {failed:,} of {s.rows_total:,}; spent ${spent:.4f}"
        + f"\n  this run: requests {s.requests_sent:,} ({s.rows_from_cache:,} rows from cache), 429s {s.rate_limited},"
        + f" retries {s.retries}"
    )
    if result.output_path:
        summary += f"\n  output: {result.output_path}"
    err.print(summary, highlight=False)
    raise typer.Exit(exit_code(result))


def exit_code(result: RunResult) -> int:
    if result.status is JobStatus.SUCCEEDED:
        return EXIT_OK
    if result.error is not None:
        return EXIT_ERROR
    return _EXIT_BY_CAUSE.get(result.cause, EXIT_INTERRUPTED) if result.cause else EXIT_FATAL


async def _run(spec: JobSpec, state_dir: Optional[Path], quiet: bool, *, use_cache: bool = True, wait: bool = False) -> RunResult:
    progress: list[asyncio.Task[None]] = []

    def on_start(runner: engine.JobRunner) -> None:
        if not quiet:
            progress.append(asyncio.create_task(show_progress(runner.stats, err)))

    try:
        return await engine.run_job(spec, state_dir=state_dir, on_start=on_start, handle_signals=True, use_cache=use_cache, wait=wait)
    finally:
        for t in progress:
            t.cancel()
        await asyncio.gather(*progress, return_exceptions=True)


@app.command()
def estimate(
    job_file: Optional[Path] = typer.Argument(None, help="A job file (TOML or YAML); flags override it."),
    input: Optional[str] = typer.Option(None, "--input", "-i"),
    input_format: Optional[str] = typer.Option(None, "--input-format"),
    id_column: Optional[str] = typer.Option(None, "--id-column"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p"),
    system: Optional[str] = typer.Option(None, "--system"),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    provider: Optional[str] = typer.Option(None, "--provider"),
    base_url: Optional[str] = typer.Option(None, "--base-url"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env"),
    kind: Optional[str] = typer.Option(None, "--kind"),
    schema: Optional[str] = typer.Option(None, "--schema"),
    output: Optional[str] = typer.Option(None, "--output", "-o"),
    rpm: Optional[float] = typer.Option(None, "--rpm"),
    tpm: Optional[float] = typer.Option(None, "--tpm"),
    input_tpm: Optional[float] = typer.Option(None, "--input-tpm"),
    output_tpm: Optional[float] = typer.Option(None, "--output-tpm"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    expected_output_tokens: Optional[int] = typer.Option(None, "--expected-output-tokens", help="Per row (default: the job's running mean, else 256; at most max_tokens)."),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """Rows, input tokens, expected output tokens, cost and the shortest duration — sending nothing."""
    spec = _spec_from_flags(
        job_file,
        input=input, input_format=input_format, id_column=id_column, prompt=prompt, system=system, model=model,
        provider=provider, base_url=base_url, api_key_env=api_key_env, kind=kind, schema=schema, output=output,
        output_format=None, columns=None, rpm=rpm, tpm=tpm, input_tpm=input_tpm, output_tpm=output_tpm,
        max_in_flight=None, max_tokens=max_tokens, temperature=None, seed=None, top_p=None, max_attempts=None,
        budget_usd=None, allow_partial=None, chunk_size=None, timeout_s=None, context_tokens=None,
    )
    store = engine.open_store(state_dir)
    try:
        plan = engine.make_plan(spec, store=store)
        est = engine.estimate(plan, store, expected_output_tokens)
    finally:
        store.close()
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


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


def _find_job(store: Any, job: str) -> Any:
    found = store.find_jobs(job)
    if not found:
        raise BackfillError(f"No job {job} in this state directory; `backfill jobs` lists them.")
    if len(found) > 1:
        raise BackfillError(f"Job id {job} is ambiguous ({len(found)} jobs); give more characters.")
    return found[0]


@app.command()
def resume(
    job: str = typer.Argument(..., help="Job id (a unique prefix is enough)."),
    budget_usd: Optional[float] = typer.Option(None, "--budget-usd", help="A new budget (e.g. higher, after a budget stop)."),
    allow_partial: bool = typer.Option(False, "--allow-partial"),
    state_dir: Optional[Path] = StateDir,
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    no_cache: bool = NoCache,
    wait: bool = Wait,
) -> None:
    """Continue a job that stopped; answers that already arrived are not paid for again."""
    store = engine.open_store(state_dir)
    try:
        record = _find_job(store, job)
    finally:
        store.close()
    data = record.spec
    if not data.get("input", {}).get("path"):
        raise BackfillError(f"Job {record.id} read a frame from Python; resume it by calling backfill.run again with the same frame.")
    if budget_usd is not None:
        data["budget"]["usd"] = budget_usd
    if allow_partial:
        data["budget"]["allow_partial"] = True
    spec = build_spec(data)
    _run_and_report(spec, state_dir, quiet, use_cache=not no_cache, wait=wait)


@app.command()
def status(job: str = typer.Argument(...), state_dir: Optional[Path] = StateDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """One job: status, rows, spend, dead letters and its latest events."""
    store = engine.open_store(state_dir)
    try:
        rec = _find_job(store, job)
        dead = store.dead_letters(rec.id, limit=10)
        events = store.events(rec.id)[-5:]
        task = rec.spec["task"]
        endpoint = key_endpoint(task["provider"], task.get("base_url"))
        mode = store.get_structured_mode(mode_key(task["provider"], task.get("base_url")), task["model"]) if task.get("schema") else None
    finally:
        store.close()
    if as_json:
        out.print_json(json.dumps({
            "id": rec.id, "status": rec.status, "stop_cause": rec.stop_cause, "reason": rec.reason,
            "rows_total": rec.rows_total, "structured_mode": mode, "lease_holder": rec.lease_holder,
            "rows_ok": rec.rows_ok, "rows_failed": rec.rows_failed, "spent_usd": rec.spent_usd,
            "requests": rec.requests, "rate_limited": rec.rate_limited,
            "input_tokens": rec.input_tokens, "output_tokens": rec.output_tokens, "output": rec.spec["output"].get("path"),
            "dead_letters": [{"row_id": d.row_id, "reason": d.reason} for d in dead],
        }))
        return
    cause = f" ({rec.stop_cause})" if rec.stop_cause else ""
    out.print(f"[bold]job {rec.id}[/bold]  {rec.status}{cause}" + (f" — {rec.reason}" if rec.reason else ""), highlight=False)
    out.print(f"  model {task['model']} via {task['provider']}; output {rec.spec['output'].get('path')}", highlight=False)
    if rec.status is JobStatus.RUNNING and rec.lease_holder:
        out.print(f"  running in process {rec.lease_holder}", highlight=False)
    if mode is not None:
        out.print(f"  structured output sent as {mode} (what {endpoint} accepts)", highlight=False)
    out.print(f"  rows ok {rec.rows_ok:,}, failed {rec.rows_failed:,} of {rec.rows_total or 0:,}")
    out.print(f"  requests {rec.requests:,} (429s {rec.rate_limited:,}); tokens in {rec.input_tokens:,}, out {rec.output_tokens:,}; spent ${rec.spent_usd:.4f}")
    for d in dead:
        out.print(f"  dead letter {d.row_id}: {d.reason}", highlight=False)
    for at, kind_, message in events:
        out.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))} {kind_}: {message}", highlight=False)


@app.command()
def jobs(state_dir: Optional[Path] = StateDir, limit: int = typer.Option(50, "--limit")) -> None:
    """The jobs in this state directory, newest first."""
    store = engine.open_store(state_dir)
    try:
        records = store.list_jobs(limit=limit)
    finally:
        store.close()
    table = Table("job", "status", "model", "rows ok", "failed", "total", "spent", "updated")
    for r in records:
        table.add_row(
            r.id, r.status + (f" ({r.reason})" if r.reason and r.status != "failed" else ""), r.spec["task"]["model"],
            f"{r.rows_ok:,}", f"{r.rows_failed:,}", f"{r.rows_total or 0:,}", f"${r.spent_usd:.4f}",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated)),
        )
    out.print(table)


@app.command()
def cancel(job: str = typer.Argument(...), state_dir: Optional[Path] = StateDir) -> None:
    """Cancel a job; a running one stops within a second, keeping what is already written."""
    store = engine.open_store(state_dir)
    try:
        rec = _find_job(store, job)
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


cache_app = typer.Typer(no_args_is_help=True, help="The response cache: answers paid for once, reused by identical requests.")
app.add_typer(cache_app, name="cache")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' → seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise SpecError(f"Cannot read the duration '{text}'; write a number and a unit, e.g. 30d, 12h or 90m.")
    return float(m.group(1)) * _SECONDS[m.group(2)]


@cache_app.command("clear")
def cache_clear(
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Only answers older than this, e.g. 30d."),
    job: Optional[str] = typer.Option(None, "--job", help="Only answers paid for by this job (a unique id prefix is enough)."),
    state_dir: Optional[Path] = StateDir,
) -> None:
    """Delete cached answers (all of them, or those older than a duration or of one job)."""
    seconds = parse_duration(older_than) if older_than else None
    store = engine.open_store(state_dir)
    try:
        job_id = _find_job(store, job).id if job else None
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
        err.print(f"error: {e}", highlight=False, markup=False)
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
