"""Live progress of a running job in a terminal or notebook: rows, requests/s, tokens/min against the limit, 429s, cost, ETA."""

from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from backfill.engine.stats import JobStats


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:.0f}"


def describe(stats: JobStats) -> str:
    rps, tpm = stats.rates()
    eta = stats.eta_s()
    eta_text = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
    return (
        f"ok {stats.rows_ok:,}  failed {stats.rows_failed:,}  left {stats.rows_left:,} │ "
        f"{rps:.0f}/{_fmt_rate(stats.rpm_limit / 60 if stats.rpm_limit else None)} req/s  "
        f"{_fmt_rate(tpm)}/{_fmt_rate(stats.tpm_limit)} tok/min │ "
        f"in flight {stats.in_flight}  429s {stats.rate_limited}  retries {stats.retries} │ "
        f"${stats.cost_usd:.4f}  ETA {eta_text}"
    )


async def show_progress(stats: JobStats, console: Console | None = None, interval_s: float = 0.5) -> None:
    """Redraw a progress bar until cancelled."""
    progress = Progress(
        TextColumn("[bold]{task.fields[job]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console or Console(stderr=True),
        transient=False,
    )
    task = progress.add_task("job", total=stats.rows_total, job=stats.job_id, detail="")
    with progress:
        try:
            while True:
                progress.update(task, completed=stats.rows_done, detail=describe(stats))
                await asyncio.sleep(interval_s)
        finally:
            progress.update(task, completed=stats.rows_done, detail=describe(stats))
