"""One snapshot of a running job's progress, and the words for it, shared by the terminal, the log lines and the notebook."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from backfill.engine.stats import JobStats
from backfill.limits import Bound

# Reserved tokens/min are shown beside those used once they are this many times more.
RESERVED_SHOWN = 1.5


@dataclass(frozen=True)
class Snapshot:
    """What every progress view shows. Rows, requests and spend count as the ledger does: all runs of the job
    together; `rows_done` is answered rows (committed or not), `rows_committed` those in committed chunks."""

    job_id: str
    rows_total: int
    rows_done: int
    rows_ok: int
    rows_failed: int
    rows_committed: int
    rows_answered_not_committed: int
    in_flight: int
    max_in_flight: int | None
    rows_per_s: float
    requests: int
    requests_per_min: float
    rpm_limit: float | None
    tokens_per_min: float  # used (the usage the provider bills)
    tokens_reserved_per_min: float  # reserved at admission: prompt and max_tokens, as OpenAI counts tokens/min
    tpm_limit: float | None
    rate_limited: int
    retries: int
    cost_usd: float
    budget_usd: float | None
    eta_s: float | None
    binding: str | None  # the limit that holds the pace back now, if one does
    binding_note: str | None  # what to do about it, when the user can

    @property
    def fraction(self) -> float:
        return 1.0 if self.rows_total <= 0 else min(1.0, self.rows_done / self.rows_total)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows_per_s"] = round(self.rows_per_s, 2)
        data["requests_per_min"] = round(self.requests_per_min, 1)
        data["tokens_per_min"] = round(self.tokens_per_min)
        data["tokens_reserved_per_min"] = round(self.tokens_reserved_per_min)
        data["cost_usd"] = round(self.cost_usd, 6)
        data["eta_s"] = None if self.eta_s is None else round(self.eta_s, 1)
        return data


def snapshot(stats: JobStats) -> Snapshot:
    binding = stats.binding()
    return Snapshot(
        job_id=stats.job_id, rows_total=stats.rows_total, rows_done=stats.rows_done, rows_ok=stats.rows_ok,
        rows_failed=stats.rows_failed, rows_committed=stats.rows_committed,
        rows_answered_not_committed=stats.rows_answered_not_committed, in_flight=stats.in_flight,
        max_in_flight=stats.max_in_flight, rows_per_s=stats.rows_per_s(), requests=stats.requests,
        requests_per_min=stats.requests_per_min(), rpm_limit=stats.rpm_limit, tokens_per_min=stats.tokens_per_min(),
        tokens_reserved_per_min=stats.tokens_reserved_per_min(), tpm_limit=stats.tpm_limit, rate_limited=stats.rate_limited_total, retries=stats.retries, cost_usd=stats.cost_usd,
        budget_usd=stats.budget_usd, eta_s=stats.eta_s(), binding=None if binding is None else str(binding),
        binding_note=_note(stats, binding),
    )


def _note(stats: JobStats, binding: Bound | None) -> str | None:
    reserve = stats.unset_max_tokens_reserve
    if reserve and binding in (Bound.TOKENS, Bound.OUTPUT_TOKENS):
        return (
            f"max_tokens is unset: each request reserves {reserve:,} output tokens of the {binding} limit; "
            "set --max-tokens (max_tokens=) to what an answer needs, to send more."
        )
    if binding is Bound.BUDGET and stats.budget_usd is not None:
        return f"the budget of ${stats.budget_usd:.4f} is spent; resume with a higher --budget-usd."
    return None


def number(value: float) -> str:
    """12,345 → 12k; 1,234,567 → 1.2M: short enough for a narrow terminal."""
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:,.0f}"


def per_s(value: float) -> str:
    """A rate per second: one decimal below 10, so that a slow job does not read `0 rows/s`."""
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86_400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"


def pace(value: float, limit: float | None, unit: str) -> str:
    """`2,950/3,000 requests/min`: the pace as the provider counts it, against the limit when one is known."""
    return f"{number(value)}/{number(limit)} {unit}" if limit else f"{number(value)} {unit}"


def details(snap: Snapshot) -> list[str]:
    """The second line's parts, most useful first: each a few words that make sense alone."""
    parts = [
        f"committed {snap.rows_committed:,}",
        f"answered {snap.rows_answered_not_committed:,}",
        f"in flight {snap.in_flight:,}",
        pace(snap.requests_per_min, snap.rpm_limit, "req/min"),
        *_tokens(snap),
    ]
    if snap.binding:
        parts.append(f"bound by {snap.binding}")
    parts += [f"failed {snap.rows_failed:,}", f"429s {snap.rate_limited:,}", f"retries {snap.retries:,}", f"requests {snap.requests:,}"]
    if snap.budget_usd is not None:
        parts.append(f"budget ${snap.budget_usd:.2f}")
    return parts


def _tokens(snap: Snapshot) -> list[str]:
    """Tokens/min against the limit as it is counted; when the reservations (max_tokens) count far more than the
    tokens used, both, so that a limit bound at a low usage makes sense."""
    if snap.tpm_limit and snap.tokens_reserved_per_min > RESERVED_SHOWN * snap.tokens_per_min:
        return [pace(snap.tokens_reserved_per_min, snap.tpm_limit, "tok/min reserved"), f"{number(snap.tokens_per_min)} used"]
    return [pace(snap.tokens_per_min, snap.tpm_limit, "tok/min")]


def line(snap: Snapshot) -> str:
    """One plain line for a log: everything, no bar."""
    head = (
        f"job {snap.job_id}: {snap.rows_done:,}/{snap.rows_total:,} rows ({snap.fraction:.0%}), "
        f"{per_s(snap.rows_per_s)} rows/s, ${snap.cost_usd:.4f}, ETA {duration(snap.eta_s)}"
    )
    text = head + " | " + ", ".join(details(snap))
    return f"{text} | {snap.binding_note}" if snap.binding_note else text
