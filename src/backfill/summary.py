"""A job's outcome in one record: what `run --json`, `backfill.last_job()` and the notebook's last line show.

Rows and spend come from the ledger (all runs of the job together); `requests` and
`rows_from_cache` beside them are this run's own. The field names are a stable interface.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from backfill.engine.runner import RunResult
from backfill.store.sqlite import JobRecord


@dataclass(frozen=True)
class JobSummary:
    job_id: str
    status: str
    stop_cause: str | None
    reason: str | None
    rows_total: int
    rows_ok: int
    rows_failed: int  # dead letters
    requests: int  # sent, all runs of the job together
    requests_this_run: int
    rows_from_cache: int  # this run
    rate_limited: int  # 429s, all runs
    input_tokens: int
    output_tokens: int
    cost_usd: float
    output: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """A few lines for a person, each within 80 columns for ordinary counts."""
        head = f"job {self.job_id}: {self.status}" + (f" — {self.reason}" if self.reason else "")
        lines = [
            head,
            f"  rows ok {self.rows_ok:,}, dead letters {self.rows_failed:,} of {self.rows_total:,}; spent ${self.cost_usd:.4f}",
            f"  requests {self.requests:,} ({self.requests_this_run:,} this run; {self.rows_from_cache:,} rows from cache),"
            f" 429s {self.rate_limited:,}",
        ]
        if self.output:
            lines.append(f"  output: {self.output}")
        return "\n".join(lines)


def summarize(result: RunResult, record: JobRecord | None) -> JobSummary:
    """The summary of a finished run, by the ledger's record when there is one."""
    s = result.stats
    cause = result.cause.value if result.cause is not None else None
    if record is None:
        return JobSummary(
            result.job_id, result.status.value, cause, result.reason, s.rows_total, s.rows_ok, s.rows_failed,
            s.requests_before + s.requests_sent, s.requests_sent, s.rows_from_cache, s.rate_limited_before + s.rate_limited,
            s.input_tokens, s.output_tokens, s.cost_usd, result.output_path,
        )
    return JobSummary(
        record.id, result.status.value, cause, result.reason, record.rows_total or s.rows_total, record.rows_ok,
        record.rows_failed, record.requests, s.requests_sent, s.rows_from_cache, record.rate_limited,
        record.input_tokens, record.output_tokens, record.spent_usd, result.output_path,
    )
