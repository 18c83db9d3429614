"""The live display in a terminal: a headline that fits 80 columns (job id, bar, rows, rows/s, cost, ETA), details below."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from backfill.engine.stats import JobStats
from backfill.progress.view import Snapshot, details, duration, per_s, snapshot

BAR_MIN = 8
BAR_MAX = 40
DETAIL_LINES = 2  # at most this many lines of details below the headline; the rest is dropped at narrow widths
SEP = " · "


class LiveView:
    """A rich renderable that reads the job's counters each time it is drawn, at the console's width."""

    def __init__(self, stats: JobStats):
        self.stats = stats

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        snap = snapshot(self.stats)
        width = options.max_width
        yield headline(snap, width)
        for text in detail_lines(snap, width):
            yield Text(text, style="dim", no_wrap=True, overflow="crop")
        if snap.binding_note:
            yield Text(snap.binding_note, style="yellow")


def headline(snap: Snapshot, width: int) -> Text:
    """`a1b2c3d4e5f6 ━━━━━━━━━━━ 1,234/10,000 12% 45 rows/s $0.0123 ETA 3m15s`; the bar takes what is left, and
    goes first when even that does not fit. The job id is never shortened: users type it."""
    count = f"{snap.rows_done:,}/{snap.rows_total:,}"
    tail = [f"{snap.fraction:.0%}", f"{per_s(snap.rows_per_s)} rows/s", f"${snap.cost_usd:.4f}", f"ETA {duration(snap.eta_s)}"]
    if width >= 120 and snap.rows_failed:
        tail.insert(1, f"{snap.rows_failed:,} failed")
    fixed = len(snap.job_id) + 1 + len(count) + sum(1 + len(t) for t in tail)
    while fixed > width and len(tail) > 1:  # narrower than anyone uses: drop from the percentage on
        fixed -= 1 + len(tail.pop(0))
    bar = min(BAR_MAX + max(0, width - 120) // 4, width - fixed - 1)
    text = Text(no_wrap=True, overflow="crop")
    text.append(snap.job_id, style="bold")
    text.append(" ")
    if bar >= BAR_MIN:
        done = round(bar * snap.fraction)
        text.append("━" * done, style="green" if snap.fraction >= 1 else "magenta")
        text.append("━" * (bar - done), style="grey23")
        text.append(" ")
    text.append(count)
    for t in tail:
        text.append(" " + t)
    return text


def detail_lines(snap: Snapshot, width: int) -> list[str]:
    """Pack the details, most useful first, into at most DETAIL_LINES lines of `width`."""
    lines: list[str] = []
    current = ""
    for part in details(snap):
        candidate = f"{current}{SEP}{part}" if current else "  " + part
        if len(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        if len(lines) == DETAIL_LINES:
            return lines
        current = "  " + part
    if current and len(lines) < DETAIL_LINES:
        lines.append(current)
    return lines
