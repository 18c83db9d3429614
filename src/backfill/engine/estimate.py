"""Estimate a job without sending anything: rows, input tokens, expected and worst-case output, cost, shortest duration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backfill.engine.plan import Plan
from backfill.errors import BackfillError, SpecError
from backfill.providers import get_provider
from backfill.store import Store

# Output tokens a chat answer is expected to have before the job has answers of its own: about a
# paragraph (~190 English words). Labels and short JSON answers run well under it, so a budget
# checked against it errs high; long generations run over it: pass --expected-output-tokens.
DEFAULT_EXPECTED_OUTPUT = 256

SOURCE_DEFAULT = "default"
SOURCE_FLAG = "--expected-output-tokens"
SOURCE_EMBEDDING = "embeddings have no output"


@dataclass
class Estimate:
    rows: int
    rows_cached: int  # answered already; costs nothing again
    rows_failing: int  # the template fails on them; they become dead letters without a request
    requests: int
    input_tokens: int
    expected_output_tokens: int  # all rows to send together
    expected_output_per_row: int
    expected_output_source: str  # "default", "running mean of N answers" or "--expected-output-tokens"
    cost_usd: float  # at the expected output
    worst_case_output_tokens: int  # every row answering at max_tokens (or the reserve when it is unset)
    worst_case_cost_usd: float
    max_tokens: int | None  # what each request sets; None: unset, and plan.UNSET_MAX_TOKENS_RESERVE is reserved
    min_duration_s: float | None  # None when no limit is known before the run
    bound_by: str | None  # which limit sets the duration


def estimate(
    plan: Plan, store: Store | None = None, expected_output_tokens: int | None = None, batch: int = 2000, *, scope: str = ""
) -> Estimate:
    """Render every row (streaming) and count; answers already in the cache (in `scope`) are free.

    Output is priced at what an answer is expected to have (`expected_output`), and beside it at
    the worst case, every answer as long as max_tokens allows.
    """
    rows = cached = failing = tokens_in = reserve_out = 0
    sent_params: dict[str, Any] | None = None  # the parameters as sent, a provider's default max_tokens included
    keys: list[tuple[str, int, int]] = []

    def flush() -> None:
        nonlocal cached, tokens_in, reserve_out
        hits = store.get_responses((k for k, _, _ in keys), scope=scope) if store else {}
        for key, t_in, t_out in keys:
            if key in hits:
                cached += 1
            else:
                tokens_in += t_in
                reserve_out += t_out
        keys.clear()

    for record_batch in plan.source.batches(batch):
        for row in record_batch.to_pylist():
            rows += 1
            try:
                request = plan.build_request(row)
            except BackfillError:
                failing += 1
                continue
            if sent_params is None:
                sent_params = request.params
            keys.append((request.key, request.prompt_tokens, request.max_output_tokens))
        flush()
    to_send = rows - cached - failing
    max_tokens = _max_tokens(plan.spec.task.params if sent_params is None else sent_params)
    requests = _embedding_requests(plan, to_send, tokens_in) if plan.is_embedding else to_send
    per_row_out, source = expected_output(plan, store, expected_output_tokens, max_tokens)
    out_tokens = per_row_out * to_send
    duration, bound = _min_duration(plan, requests, tokens_in, reserve_out, out_tokens)
    return Estimate(
        rows=rows,
        rows_cached=cached,
        rows_failing=failing,
        requests=requests,
        input_tokens=tokens_in,
        expected_output_tokens=out_tokens,
        expected_output_per_row=per_row_out,
        expected_output_source=source,
        cost_usd=plan.cost(tokens_in, out_tokens),
        worst_case_output_tokens=reserve_out,
        worst_case_cost_usd=plan.cost(tokens_in, reserve_out),
        max_tokens=None if plan.is_embedding else max_tokens,
        min_duration_s=duration,
        bound_by=bound,
    )


def expected_output(plan: Plan, store: Store | None, given: int | None, max_tokens: int | None) -> tuple[int, str]:
    """Output tokens per row to price, and where the figure comes from: `given` (the flag), else the
    job's running mean once it has answers, else the default; never more than an answer may have."""
    if plan.is_embedding:
        return 0, SOURCE_EMBEDDING
    if given is not None:
        if given < 0:
            raise SpecError(f"--expected-output-tokens is {given}; give the output tokens expected per row (0 or more).")
        per_row, source = given, SOURCE_FLAG
    else:
        per_row, source = _running_mean(plan, store) or (DEFAULT_EXPECTED_OUTPUT, SOURCE_DEFAULT)
    cap = max_tokens or plan.prices.max_output_tokens(plan.spec.task.model)
    if cap is not None and per_row > cap:
        what = "max_tokens" if max_tokens else "the model's max output"
        return cap, f"{source}, capped at {what} {cap:,}"
    return per_row, source


def _running_mean(plan: Plan, store: Store | None) -> tuple[int, str] | None:
    job = store.get_job(plan.job_id) if store else None
    # `answers` (billed answers) is a newer ledger column; before it, there is no mean to take.
    answers = getattr(job, "answers", 0) if job is not None else 0
    if job is None or not answers:
        return None
    return round(job.output_tokens / answers), f"running mean of {answers:,} answers"


def _max_tokens(params: dict[str, Any]) -> int | None:
    value = params.get("max_tokens") or params.get("max_completion_tokens")
    return int(value) if value else None


def _embedding_requests(plan: Plan, rows: int, tokens: int) -> int:
    """The fewest requests the rows pack into: a pack is bound by inputs and by tokens per request."""
    provider = get_provider(plan.spec.task.provider)
    by_inputs = -(-rows // provider.max_embedding_inputs)
    by_tokens = -(-tokens // provider.max_embedding_tokens) if provider.max_embedding_tokens else 0
    return max(by_inputs, by_tokens)


def _min_duration(plan: Plan, requests: int, tokens_in: int, reserve_out: int, out_tokens: int) -> tuple[float | None, str | None]:
    lim = plan.spec.limits
    candidates: list[tuple[float, str]] = []
    if lim.rpm:
        candidates.append((requests / lim.rpm * 60, "requests/min"))
    if lim.tpm:
        # OpenAI counts max_tokens at admission, so the reservation is what binds.
        candidates.append(((tokens_in + reserve_out) / lim.tpm * 60, "tokens/min"))
    if lim.input_tpm:
        candidates.append((tokens_in / lim.input_tpm * 60, "input tokens/min"))
    if lim.output_tpm:
        candidates.append((out_tokens / lim.output_tpm * 60, "output tokens/min"))
    if not candidates:
        return None, None
    return max(candidates)
