"""Progress in a Jupyter notebook with IPython's own display (no ipywidgets): one output updated in place, ending with the summary."""

from __future__ import annotations

import html
from typing import Any

from backfill.engine.stats import JobStats
from backfill.progress.view import Snapshot, details, duration, per_s, snapshot
from backfill.summary import JobSummary


class Frame:
    """One state of the display; IPython calls the reprs (HTML in Jupyter, text elsewhere)."""

    def __init__(self, snap: Snapshot, summary: JobSummary | None = None):
        self.snap, self.summary = snap, summary

    def _headline(self) -> str:
        s = self.snap
        return (
            f"job {s.job_id}: {s.rows_done:,}/{s.rows_total:,} rows ({s.fraction:.0%}), {per_s(s.rows_per_s)} rows/s, "
            f"${s.cost_usd:.4f}, ETA {duration(s.eta_s) if s.fraction < 1 else '0s'}"
        )

    def __repr__(self) -> str:
        lines = [self._headline(), "  " + " · ".join(details(self.snap))]
        if self.snap.binding_note:
            lines.append("  " + self.snap.binding_note)
        if self.summary is not None:
            lines.append(self.summary.text())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        s = self.snap
        parts = [
            f'<div><progress value="{s.rows_done}" max="{max(s.rows_total, 1)}" style="width:40em"></progress> '
            f"<b>{s.fraction:.0%}</b></div>",
            f"<div>{html.escape(self._headline())}</div>",
            f'<div style="opacity:0.7">{html.escape(" · ".join(details(s)))}</div>',
        ]
        if s.binding_note:
            parts.append(f"<div>{html.escape(s.binding_note)}</div>")
        if self.summary is not None:
            parts.append(f"<pre>{html.escape(self.summary.text())}</pre>")
        return "\n".join(parts)


class NotebookProgress:
    """Shows a job's progress in the cell that runs it; `update` redraws, `finish` draws the final state and the summary."""

    def __init__(self, stats: JobStats):
        from IPython.display import display

        self.stats = stats
        self._handle: Any = display(Frame(snapshot(stats)), display_id=True)

    def update(self) -> None:
        if self._handle is not None:
            self._handle.update(Frame(snapshot(self.stats)))

    def finish(self, summary: JobSummary | None) -> None:
        if self._handle is not None:
            self._handle.update(Frame(snapshot(self.stats), summary))
