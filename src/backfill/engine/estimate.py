"""Estimate a job without sending anything: rows, exact input tokens, expected output, cost, shortest duration."""

from __future__ import annotations

from dataclasses import dataclass

from backfill.engine.plan import Plan
from backfill.errors import BackfillError
from backfill.providers import get_provider
from backfill.store import Store

# Without max_tokens, assume a short answer of this many tokens per row.
DEFAULT_EXPECTED_OUTPUT = 256


@dataclass
class Estimate:
    rows: int
    rows_cached: int  # answered already; costs nothing again
    rows_failing: int  # the template fails on them; they become dead letters without a request
    requests: int
    input_tokens: int
    expected_output_tokens: int
    cost_usd: float
    min_duration_s: float | None  # None when no limit is known before the run
    bound_by: str | None  # which limit sets the duration


def estimate(plan: Plan, store: Store | None = None, expected_output_tokens: int | None = None, batch: int = 2000) -> Estimate:
    """Render every row (streaming) and count; answers already in the cache are free."""
    spec = plan.spec
    per_row_out = 0 if plan.is_embedding else expected_output_tokens or int(spec.task.params.get("max_tokens") or DEFAULT_EXPECTED_OUTPUT)
    rows = cached = failing = tokens_in = reserve_out = 0
    keys: list[tuple[str, int, int]] = []

    def flush() -> None:
        nonlocal cached, tokens_in, reserve_out
        hits = store.get_responses(k for k, _, _ in keys) if store else {}
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
            keys.append((request.key, request.prompt_tokens, request.max_output_tokens))
        flush()
    to_send = rows - cached - failing
    requests = -(-to_send // _pack_size(plan)) if plan.is_embedding else to_send
    out_tokens = per_row_out * to_send
    cost = plan.cost(tokens_in, out_tokens)
    duration, bound = _min_duration(plan, requests, tokens_in, reserve_out, out_tokens)
    return Estimate(rows, cached, failing, requests, tokens_in, out_tokens, cost, duration, bound)


def _pack_size(plan: Plan) -> int:
    provider = "openai" if plan.spec.task.provider == "sim" else plan.spec.task.provider
    return get_provider(provider).max_embedding_inputs


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
