"""The configured --rpm / --tpm are never exceeded, counted from what the client sent.

The simulator's own limits are set far above the job's, so it admits everything and cannot bound
what it sees: every request that reached it (any status) is counted by its arrival time, and no
sliding window may hold more than the limit's share of that window plus the burst the limiter is
documented to allow, nor may the requests sent since the sim started exceed the limit's share of that
time plus the burst the limiter starts with. The allowances come from the limiter's constants, not
from observed runs.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass
from pathlib import Path

import backfill
from backfill.limits import LaneLimits
from backfill.limits.local import EARLY_S, LIFT_SHARE, MAX_BURST_S, SERVER_BURST_SHARE
from backfill.sim import KeyLimits, SimConfig, Simulator
from backfill.sim.log import LogEntry
from conftest import make_rows

PROMPT = "Row {{ id }} says: {{ text }}"
MAX_TOKENS = 50
# Far above any job's limit here: the sim must never refuse, so it cannot be what bounds the counts.
SIM_LIMITS = KeyLimits(rpm=10_000_000, tpm=10_000_000_000)
WINDOWS_S = (0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Burst:
    """What the limiter may send beyond `limit × seconds / 60`, in seconds of the limit, as
    backfill.limits documents it: a bucket that starts full at `LaneLimits.burst_s`, grows to
    SERVER_BURST_SHARE of the server's bucket within MAX_BURST_S, and is paid that growth at most
    LIFT_SHARE above the limit; an admission may run EARLY_S ahead of its refill."""

    start_s: float  # what the bucket holds when the job starts
    capacity_s: float  # the most it can hold at any moment
    owed_s: float  # its growth, paid on top of the refill
    lift_share: float  # the pace at which the growth is paid, as a share of the limit
    early_s: float  # how far an admission may run ahead of its refill (the bucket's debt)

    @classmethod
    def documented(cls) -> Burst:
        start = LaneLimits().burst_s
        grown = max(start, SERVER_BURST_SHARE * MAX_BURST_S)
        return cls(start_s=start, capacity_s=grown, owed_s=grown - start, lift_share=LIFT_SHARE, early_s=EARLY_S)

    def in_any_window(self, per_minute: float, window_s: float) -> float:
        """The most any window may hold: what the bucket held when it opened, its refill and the
        growth paid during it, and its debt at the end."""
        return self._bound(per_minute, self.capacity_s, window_s)

    def since_start(self, per_minute: float, elapsed_s: float) -> float:
        """The most sent within `elapsed_s` of the sim's start. The job's limiter was made after the
        sim started and a request arrives after it was admitted, so this holds without any
        allowance for the time a request takes to reach the server."""
        return self._bound(per_minute, self.start_s, elapsed_s)

    def _bound(self, per_minute: float, held_s: float, elapsed_s: float) -> float:
        lifted = min(self.owed_s, self.lift_share * elapsed_s)
        return per_minute / 60.0 * (held_s + elapsed_s + lifted + self.early_s)


def by_arrival(entries: list[LogEntry], weight: list[int]) -> tuple[list[float], list[int]]:
    """Arrival times in order, and the cumulative weight arrived up to (and including) each."""
    order = sorted(range(len(entries)), key=lambda i: entries[i].t)
    cumulative = [0]
    for i in order:
        cumulative.append(cumulative[-1] + weight[i])
    return [entries[i].t for i in order], cumulative


def peak_in_window(times: list[float], cumulative: list[int], window_s: float) -> int:
    """The most weight that arrived in any closed window [t, t + window_s], t an arrival time."""
    return max(
        (cumulative[bisect.bisect_right(times, start + window_s)] - cumulative[k] for k, start in enumerate(times)),
        default=0,
    )


def assert_within(entries: list[LogEntry], weight: list[int], per_minute: float, what: str, stall_s: float) -> None:
    """`stall_s` is the longest the test's event loop stalled: the sim stamps arrivals on the loop
    the client runs on, so what was admitted during a stall is stamped at one instant."""
    burst = Burst.documented()
    times, cumulative = by_arrival(entries, weight)
    over = []
    for window_s in WINDOWS_S:
        peak = peak_in_window(times, cumulative, window_s)
        bound = burst.in_any_window(per_minute, window_s) + per_minute / 60.0 * stall_s
        if peak > bound:
            over.append(f"{peak} {what} in a window of {window_s} s (bound {bound:.0f})")
    for k, t in enumerate(times):
        sent, bound = cumulative[k + 1], burst.since_start(per_minute, t)
        if sent > bound:
            over.append(f"{sent} {what} by {t:.3f} s after the sim started (bound {bound:.0f})")
            break
    assert not over, f"the limit of {per_minute:,} {what}/min was exceeded: " + "; ".join(over)


async def _longest_stall(box: list[float], tick_s: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(tick_s)
        box[0] = max(box[0], loop.time() - before - tick_s)


async def run_job(tmp_path: Path, rows: int, **limits: float) -> tuple[list[LogEntry], float]:
    """A real job against a sim that admits everything: every request it received (any status), and
    the longest the event loop stalled meanwhile."""
    stall = [0.0]
    async with Simulator(SimConfig(default_limits=SIM_LIMITS, latency_s=0.02)) as sim:
        watch = asyncio.create_task(_longest_stall(stall))
        try:
            out = await backfill.arun(
                make_rows(rows).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
                params={"max_tokens": MAX_TOKENS}, state_dir=tmp_path, progress=False, return_type="arrow", **limits,
            )
        finally:
            watch.cancel()
        entries = list(sim.log.entries)
    assert out.num_rows == rows
    assert {e.path for e in entries} == {"/v1/chat/completions"}
    assert all(e.status != 429 for e in entries)  # the sim bounded nothing
    return entries, stall[0]


async def test_requests_sent_never_exceed_the_configured_rpm(tmp_path: Path) -> None:
    rpm = 6000  # 100/s: 450 rows take about 4 s
    entries, stall_s = await run_job(tmp_path, 450, rpm=rpm)
    assert len(entries) >= 450
    assert_within(entries, [1] * len(entries), rpm, "requests", stall_s)


async def test_tokens_sent_never_exceed_the_configured_tpm(tmp_path: Path) -> None:
    tpm = 240_000  # 4,000/s, at ~70 tokens a request about 57 requests/s: 250 rows take about 4 s
    entries, stall_s = await run_job(tmp_path, 250, tpm=tpm)
    # What each request reserves under an OpenAI token limit: its prompt as received, plus max_tokens.
    tokens = [e.prompt_tokens + MAX_TOKENS for e in entries]
    assert sum(tokens) > 3 * tpm / 60  # token-bound for seconds, not a single burst
    assert_within(entries, tokens, tpm, "tokens", stall_s)
