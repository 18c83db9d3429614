"""The engine: plan a job, pick its provider (starting the simulator when asked), run it, report."""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable

from backfill.engine.estimate import Estimate, estimate
from backfill.engine.plan import Plan, make_plan
from backfill.engine.runner import JobRunner, RunResult, lane_limits
from backfill.engine.stats import JobStats
from backfill.errors import BudgetExceeded
from backfill.limits import LaneLimiter, LaneLimits
from backfill.providers import get_provider
from backfill.sim import KeyLimits, SimConfig, Simulator
from backfill.spec import JobSpec
from backfill.store import Store

__all__ = ["Estimate", "JobRunner", "JobStats", "Plan", "RunResult", "estimate", "make_plan", "run_job", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = ".backfill"


def builtin_sim_config() -> SimConfig:
    """The simulator the quickstart runs on: limits like a modest paid tier, short latency."""
    return SimConfig(default_limits=KeyLimits(rpm=3000, tpm=2_000_000), latency_s=0.3, latency_sigma=0.3, log_in_memory=False)


def open_store(state_dir: str | Path | None) -> Store:
    return Store(Path(state_dir or DEFAULT_STATE_DIR) / "backfill.db")


def check_budget(plan: Plan, store: Store) -> Estimate | None:
    """Refuse before sending anything when the estimate is over the budget (unless a partial run is allowed)."""
    budget = plan.spec.budget
    if budget.usd is None or budget.allow_partial:
        return None
    est = estimate(plan, store)
    spent = (job.spent_usd if (job := store.get_job(plan.job_id)) else 0.0)
    if spent + est.cost_usd > budget.usd:
        raise BudgetExceeded(
            f"The estimated cost ${est.cost_usd:.4f} (plus ${spent:.4f} already spent) exceeds the budget"
            f" ${budget.usd:.4f}; raise --budget-usd, or pass --allow-partial to run until the budget is spent."
        )
    return est


async def run_job(
    spec: JobSpec,
    *,
    data: Any = None,
    state_dir: str | Path | None = None,
    on_start: Callable[[JobRunner], None] | None = None,
    handle_signals: bool = False,
    api_key: str | None = None,
    limiter_for: Callable[[str, LaneLimits], LaneLimiter] | None = None,
) -> RunResult:
    """Plan and run one job to its end (or until stopped).

    `on_start` gets the runner (to show progress or stop it); `api_key` replaces the key
    from the environment (a server's named credential); `limiter_for(lane id, limits)`
    returns the limiter to share with other jobs on the same lane (default: one per job).
    """
    plan = make_plan(spec, data, api_key=api_key)
    store = open_store(state_dir)
    try:
        check_budget(plan, store)
        async with AsyncExitStack() as stack:
            provider_name, base_url = spec.task.provider, spec.task.base_url
            if provider_name == "sim":
                if base_url is None:
                    sim = await stack.enter_async_context(Simulator(builtin_sim_config()))
                    base_url = sim.base_url
                provider_name = "openai"
            provider = get_provider(provider_name)(
                base_url=base_url,
                api_key=plan.api_key,
                timeout_s=spec.task.timeout_s,
                max_connections=spec.limits.max_in_flight,
            )
            await stack.enter_async_context(provider)
            limiter = None
            if limiter_for is not None:
                limiter = limiter_for(f"{provider.lane_id}|{spec.task.model}", lane_limits(spec, provider))
            runner = JobRunner(plan, store, provider, limiter=limiter)
            if handle_signals:
                _install_signals(runner)
            if on_start:
                on_start(runner)
            return await runner.run()
    finally:
        store.close()


def _install_signals(runner: JobRunner) -> None:
    """First Ctrl-C / SIGTERM: stop dispatching and keep answers in flight; second: stop at once."""
    loop = asyncio.get_running_loop()
    count = 0

    def handler() -> None:
        nonlocal count
        count += 1
        runner.stop("paused", "interrupted; run `backfill resume` to continue", hard=count > 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handler)
