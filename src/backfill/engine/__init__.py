"""The engine: plan a job (off the event loop), open its provider, take its lease, run it, report."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any, Callable

from backfill.engine.estimate import Estimate, estimate
from backfill.engine.plan import Plan, make_plan
from backfill.engine.runner import JobRunner, RunResult, lane_limits
from backfill.engine.stats import JobStats
from backfill.errors import BudgetExceeded, Interrupted, JobBusy
from backfill.limits import LaneLimiter, LaneLimits
from backfill.providers import open_provider
from backfill.spec import JobSpec
from backfill.status import JobStatus, StopCause
from backfill.store import Store, StoreError

__all__ = ["Estimate", "JobRunner", "JobStats", "Plan", "RunResult", "estimate", "make_plan", "run_job", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = ".backfill"
# How often a run started with --wait looks whether the job's lease is free.
LEASE_POLL_S = 1.0


def store_path(state_dir: str | Path | None) -> Path:
    return Path(state_dir or DEFAULT_STATE_DIR) / "backfill.db"


def open_store(state_dir: str | Path | None) -> Store:
    return Store(store_path(state_dir))


def check_budget(plan: Plan, store: Store, cache_scope: str = "") -> Estimate | None:
    """Refuse before sending anything when the estimate is over the budget (unless a partial run is allowed);
    only answers the job may read (its cache scope) count as free."""
    budget = plan.spec.budget
    if budget.usd is None or budget.allow_partial:
        return None
    est = estimate(plan, store, scope=cache_scope)
    spent = (job.spent_usd if (job := store.get_job(plan.job_id)) else 0.0)
    if spent + est.cost_usd > budget.usd:
        raise BudgetExceeded(
            f"The estimated cost ${est.cost_usd:.4f} (plus ${spent:.4f} already spent) exceeds the budget"
            f" ${budget.usd:.4f}; raise --budget-usd, or pass --allow-partial to run until the budget is spent."
        )
    return est


def _plan_and_check(spec: JobSpec, data: Any, api_key: str | None, path: Path, cache_scope: str) -> Plan:
    """Planning renders and counts rows (seconds per million): it runs in a thread, with its own
    connection to the ledger, so that running jobs keep their pace."""
    store = Store(path)
    try:
        plan = make_plan(spec, data, api_key=api_key, store=store)
        check_budget(plan, store, cache_scope)
        return plan
    finally:
        store.close()


async def run_job(
    spec: JobSpec,
    *,
    data: Any = None,
    state_dir: str | Path | None = None,
    on_start: Callable[[JobRunner], None] | None = None,
    handle_signals: bool = False,
    api_key: str | None = None,
    limiter_for: Callable[[str, LaneLimits], LaneLimiter] | None = None,
    use_cache: bool = True,
    wait: bool = False,
    cache_scope: str = "",
) -> RunResult:
    """Plan and run one job to its end (or until stopped).

    `on_start` gets the runner (to show progress or stop it); `api_key` replaces the key
    from the environment (a server's named credential); `limiter_for(lane id, limits)`
    returns the limiter to share with other jobs on the same lane (default: one per job);
    `use_cache=False` sends rows that other jobs' answers would serve; `wait` waits while
    another process holds the job instead of raising JobBusy; `cache_scope` names the response cache the
    job reads and fills (a server's per-credential-and-owner cache; the CLI's is the default, "").
    """
    path = store_path(state_dir)
    plan = await asyncio.to_thread(_plan_and_check, spec, data, api_key, path, cache_scope)
    store = Store(path)
    try:
        async with open_provider(
            spec.task.provider, base_url=spec.task.base_url, api_key=plan.api_key,
            timeout_s=spec.task.timeout_s, max_connections=spec.limits.max_in_flight,
        ) as provider:
            limiter = None
            if limiter_for is not None:
                limiter = limiter_for(f"{provider.lane_id}|{spec.task.model}", lane_limits(spec, provider))
            runner = JobRunner(plan, store, provider, limiter=limiter, use_cache=use_cache, cache_scope=cache_scope)
            if handle_signals:
                _install_signals(runner, plan.job_id)
            if on_start:
                on_start(runner)
            while True:
                try:
                    return await runner.run()
                except JobBusy:
                    if not wait:
                        raise
                    if runner.stopping:
                        raise Interrupted(f"Stopped while waiting for job {plan.job_id}'s lease; nothing was sent.") from None
                    await asyncio.sleep(LEASE_POLL_S)
    finally:
        # A ledger that cannot be written has already failed the job with that sentence.
        with contextlib.suppress(StoreError):
            store.close()


def _install_signals(runner: JobRunner, job_id: str) -> None:
    """First Ctrl-C / SIGTERM: stop dispatching and keep answers in flight; second: stop at once."""
    loop = asyncio.get_running_loop()
    count = 0

    def handler() -> None:
        nonlocal count
        count += 1
        reason = f"interrupted; run `backfill resume {job_id}` to continue"
        runner.stop(JobStatus.PAUSED, reason, cause=StopCause.INTERRUPT, hard=count > 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)
