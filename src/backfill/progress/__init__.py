"""Progress of a running job: a live display in a terminal, plain or JSON log lines elsewhere, an updated output in a notebook."""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.live import Live

from backfill.engine.stats import JobStats
from backfill.progress.lines import Event, LogFormat, format_line, write_line
from backfill.progress.terminal import LiveView
from backfill.progress.view import Snapshot, line, snapshot

REFRESH_PER_S = 2

__all__ = ["LiveView", "LogFormat", "Snapshot", "describe", "format_line", "show_progress", "snapshot"]


def describe(stats: JobStats) -> str:
    """The job's progress now, in one plain line."""
    return line(snapshot(stats))


async def show_progress(
    stats: JobStats, console: Console | None = None, *, log_every_s: float = 30.0, log_format: str = "text"
) -> None:
    """Show progress until cancelled: a live display when `console` is a terminal and the format is text;
    otherwise a start line, one line every `log_every_s` and an end line, in `log_format` ("text" or "json")."""
    console = console or Console(stderr=True)
    fmt = LogFormat(log_format)
    if console.is_terminal and fmt is LogFormat.TEXT:
        await _live(stats, console)
    else:
        await _log(stats, console, log_every_s, fmt)


async def _live(stats: JobStats, console: Console) -> None:
    view = LiveView(stats)
    with Live(view, console=console, refresh_per_second=REFRESH_PER_S, transient=False, redirect_stdout=False, redirect_stderr=False) as live:
        try:
            await asyncio.Event().wait()
        finally:
            live.update(view, refresh=True)  # the final state stays on screen


async def _log(stats: JobStats, console: Console, every_s: float, fmt: LogFormat) -> None:
    out = console.file
    write_line(out, Event.START, snapshot(stats), fmt)
    try:
        while True:
            await asyncio.sleep(every_s)
            write_line(out, Event.PROGRESS, snapshot(stats), fmt)
    finally:
        write_line(out, Event.END, snapshot(stats), fmt)
