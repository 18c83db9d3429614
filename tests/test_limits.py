"""The limiter per lane: even pacing, in-flight cap, 429 pauses and AIMD, learning from headers."""

from __future__ import annotations

import asyncio
import time

import pytest

from backfill.errors import SpecError
from backfill.limits import LaneLimits, Limiter, Ticket
from backfill.limits.bucket import Bucket
from backfill.request import RateLimitInfo, Usage


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def started(limiter: Limiter, input_tokens: int = 0, output_tokens: int = 0) -> asyncio.Task[Ticket]:
    """Start an acquire and let it run up to its first wait; done() then says whether it was admitted at once."""
    task = asyncio.create_task(limiter.acquire(input_tokens, output_tokens))
    await asyncio.sleep(0)
    return task


async def cancel(*tasks: asyncio.Task[Ticket]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_bucket_refills_continuously_and_allows_debt() -> None:
    b = Bucket(600, burst_s=0.5, pace=1.0, now=0.0)  # 10/s, capacity 5
    assert b.capacity == 5 and b.wait_s(1) == 0
    for _ in range(5):
        b.charge(1)
    assert b.wait_s(1) == pytest.approx(0.1)
    b.refill(0.1)
    assert b.wait_s(1) == pytest.approx(0.0, abs=1e-9)
    b.refill(10.0)
    assert b.level == 5  # capped
    assert b.wait_s(50) == 0  # larger than the capacity: fits when full ...
    b.charge(50)
    assert b.wait_s(1) == pytest.approx(4.6)  # ... and the debt is paid back at the limit


async def _run_paced(limiter: Limiter, n: int, input_tokens: int, output_tokens: int) -> list[float]:
    times: list[float] = []

    async def worker() -> None:
        while len(times) < n:
            ticket = await limiter.acquire(input_tokens, output_tokens)
            times.append(time.monotonic())
            limiter.release(ticket)

    await asyncio.gather(*(worker() for _ in range(20)))
    return times[:n]


@pytest.mark.parametrize(
    ("limits", "input_tokens", "output_tokens", "per_minute"),
    [
        (LaneLimits(rpm=12_000), 0, 0, 12_000),  # requests bind: 200/s
        (LaneLimits(tpm=1_200_000), 60, 40, 12_000),  # tokens bind: 20,000 tokens/s = 200 requests/s
    ],
    ids=["rpm", "tpm"],
)
async def test_admissions_are_paced_evenly_at_the_limit(
    limits: LaneLimits, input_tokens: int, output_tokens: int, per_minute: float
) -> None:
    limiter = Limiter(limits, learn=False)
    per_s = per_minute / 60
    burst = per_s * limits.burst_s
    n = 300
    times = await _run_paced(limiter, n, input_tokens, output_tokens)
    elapsed = times[-1] - times[0]
    expected = (n - burst) / (per_s * limits.utilization)
    print(f"{n} admissions in {elapsed:.3f} s (pure pacing would take {expected:.3f} s)")
    assert expected * 0.95 <= elapsed <= expected * 1.5 + 0.3
    # No 1-second window sees more than the limit's second plus the bucket's capacity.
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[i:] if u < t + 1.0)
        assert in_window <= per_s + burst + 2
    # After the initial burst, the pace is even: no 100 ms window holds much more than 20.
    steady = times[int(burst) + 5 :]
    for i, t in enumerate(steady):
        assert sum(1 for u in steady[i : i + 60] if u < t + 0.1) <= per_s * 0.1 + 6


async def test_in_flight_cap_holds() -> None:
    limiter = Limiter(LaneLimits(max_in_flight=5), learn=False)
    in_flight = peak = done = 0

    async def one() -> None:
        nonlocal in_flight, peak, done
        ticket = await limiter.acquire(10, 10)
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        in_flight -= 1
        limiter.release(ticket)
        done += 1

    await asyncio.gather(*(one() for _ in range(50)))
    assert peak == 5 and done == 50
    assert limiter.stats().in_flight == 0


async def test_cancelled_waiter_does_not_block_or_leak() -> None:
    limiter = Limiter(LaneLimits(max_in_flight=1), learn=False)
    first = await limiter.acquire(0, 0)
    second = await started(limiter)
    third = await started(limiter)
    assert not second.done() and not third.done()
    await cancel(second)
    limiter.release(first)
    ticket = await asyncio.wait_for(third, 5)
    assert limiter.stats().in_flight == 1
    limiter.release(ticket)
    limiter.release(ticket)  # a second release is ignored
    assert limiter.stats().in_flight == 0


async def test_rate_limited_pauses_the_whole_lane_then_paces() -> None:
    limiter = Limiter(LaneLimits(rpm=60_000), learn=False)
    t1, t2, t3 = [await limiter.acquire(0, 0) for _ in range(3)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    limiter.rate_limited(t1, retry_after=0.3, rate=None)
    stats = limiter.stats()
    assert stats.n_rate_limited == 1 and stats.in_flight == 2
    assert 0.25 <= stats.paused_for_s <= 0.3
    assert stats.pace == pytest.approx(0.8)
    assert stats.paced_rpm == pytest.approx(60_000 * 0.8)
    # 429s for requests sent before the backoff do not back off again.
    limiter.rate_limited(t2, retry_after=0.3, rate=None)
    limiter.rate_limited(t3, retry_after=0.3, rate=None)
    assert limiter.stats().pace == pytest.approx(0.8)

    waiters = [await started(limiter) for _ in range(3)]
    assert not any(w.done() for w in waiters)
    tickets = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert loop.time() - start >= 0.28
    # The buckets restart empty, so the requests after the pause are paced, not a burst.
    more = [await limiter.acquire(0, 0) for _ in range(20)]
    assert loop.time() - start >= 0.28 + 20 / (1000 * 0.8) * 0.8
    for t in tickets + more:
        limiter.release(t)
    # A 429 on a request sent after the backoff backs off again.
    t4 = await limiter.acquire(0, 0)
    limiter.rate_limited(t4, retry_after=0, rate=None)
    assert limiter.stats().pace == pytest.approx(0.64, abs=0.01)  # the successes above recovered a little


async def test_pause_length_from_reset_headers_or_default() -> None:
    limiter = Limiter(LaneLimits(rpm=6000), learn=False)
    t1, t2 = await limiter.acquire(0, 0), await limiter.acquire(0, 0)
    exhausted = RateLimitInfo(remaining_requests=0, reset_requests_s=0.2, remaining_tokens=500, reset_tokens_s=30.0)
    limiter.rate_limited(t1, retry_after=None, rate=exhausted)
    assert 0.15 <= limiter.stats().paused_for_s <= 0.2
    limiter.rate_limited(t2, retry_after=None, rate=None)
    assert 0.9 <= limiter.stats().paused_for_s <= 1.0


async def test_pace_climbs_back_as_requests_succeed() -> None:
    clock = FakeClock()
    limiter = Limiter(LaneLimits(max_in_flight=10), learn=False, clock=clock)
    limiter.rate_limited(await limiter.acquire(0, 0), retry_after=0, rate=None)
    assert limiter.stats().pace == pytest.approx(0.8)
    paces = []
    for _ in range(12):
        clock.t += 1.0
        limiter.release(await limiter.acquire(0, 0))
        paces.append(limiter.stats().pace)
    assert paces == sorted(paces) and paces[0] == pytest.approx(0.82) and paces[-1] == 1.0


async def test_probes_then_adopts_and_follows_learned_limits() -> None:
    limiter = Limiter(LaneLimits())
    probes = [await limiter.acquire(10, 10) for _ in range(4)]
    assert limiter.stats().max_in_flight == 4 and not limiter.stats().learned
    fifth = await started(limiter, 10, 10)
    assert not fifth.done()
    limiter.release(probes[0], rate=RateLimitInfo(limit_requests=6000, remaining_requests=5990, limit_tokens=1_000_000))
    await asyncio.wait_for(fifth, 5)
    stats = limiter.stats()
    assert (stats.rpm, stats.tpm, stats.learned, stats.max_in_flight) == (6000, 1_000_000, True, 256)
    limiter.release(probes[1], rate=RateLimitInfo(limit_requests=3000))  # the server's limit changed
    assert limiter.stats().rpm == 3000


async def test_given_limits_win_but_a_lower_learned_limit_is_respected() -> None:
    lower_given = Limiter(LaneLimits(rpm=1000))
    higher_given = Limiter(LaneLimits(rpm=10_000))
    not_learning = Limiter(LaneLimits(rpm=10_000), learn=False)
    for limiter in (lower_given, higher_given, not_learning):
        limiter.release(await limiter.acquire(0, 0), rate=RateLimitInfo(limit_requests=6000))
    assert lower_given.stats().rpm == 1000
    assert higher_given.stats().rpm == 6000
    assert not_learning.stats().rpm == 10_000 and not not_learning.stats().learned


def test_bucket_takes_what_it_is_owed_slowly_and_keeps_a_margin() -> None:
    b = Bucket(6000, burst_s=0.5, pace=1.0, now=0.0)  # 100/s, capacity 50
    b.charge(50)
    b.grow(0.9, pace=1.0, now=0.0)  # the server holds more: 40 owed, none of it at once
    assert (b.capacity, b.level, b.owed) == (90, 0, 40)
    b.follow_server(1000, b.flow, margin=10, lift_share=0.1, now=1.0)
    assert (b.level, b.owed) == (10, 30)  # 10 % of the rate for 1 s, though the server has room for all
    b.follow_server(15, b.flow, margin=10, lift_share=0.1, now=1.5)
    assert (b.level, b.owed) == (5, 30)  # the server has less: down at once, to its room less the margin
    b.follow_server(12, b.flow, margin=10, lift_share=0.1, now=2.0)
    assert b.level == 2 and b.owed == 30  # no room beyond the margin: nothing lifted
    b.drain()  # a 429: the server had no room after all
    b.follow_server(1000, b.flow, margin=10, lift_share=0.1, now=3.0)
    assert (b.level, b.owed) == (0, 0)


async def test_remaining_pulls_the_bucket_down_never_up() -> None:
    clock = FakeClock()
    limiter = Limiter(LaneLimits(rpm=6000), clock=clock)  # capacity 50
    first = await limiter.acquire(0, 0)
    limiter.release(first, rate=RateLimitInfo(remaining_requests=10_000))  # more than we think: ignored
    admitted = [await started(limiter) for _ in range(50)]
    assert sum(t.done() for t in admitted) == 49  # 50 - 1 spent, not refilled to 50
    await cancel(*admitted)

    limiter = Limiter(LaneLimits(rpm=6000), clock=clock)
    first = await limiter.acquire(0, 0)
    limiter.release(first, rate=RateLimitInfo(remaining_requests=0))  # someone else shares the key
    waiting = await started(limiter)
    assert not waiting.done()
    clock.t += 0.05  # 5 refilled, but a margin of 50/9 stays with the server
    await asyncio.sleep(0.02)
    assert not waiting.done()
    clock.t += 0.02
    await asyncio.wait_for(waiting, 5)


async def test_the_bucket_takes_the_servers_size_from_its_headers() -> None:
    clock = FakeClock()
    # 100 requests/s; our capacity is 50 until the headers tell the server's. A server bucket of 100
    # (1 s) gives us 90 (the rest is slack for bunched arrivals); a minute's gives 1 s; 10 gives 9.
    for remaining, reset, capacity in ((99, 0.01, 90), (5999, 0.01, 90), (9, 0.01, 9)):
        limiter = Limiter(LaneLimits(rpm=6000), clock=clock)
        limiter.release(
            await limiter.acquire(0, 0),
            rate=RateLimitInfo(limit_requests=6000, remaining_requests=remaining, reset_requests_s=reset),
        )
        clock.t += 10  # idle: the bucket fills to its (new) capacity
        admitted = [await started(limiter) for _ in range(120)]
        assert sum(t.done() for t in admitted) == capacity, (remaining, reset)
        await cancel(*admitted)


async def test_token_counts_are_asked_for_only_under_a_token_limit() -> None:
    assert not Limiter(LaneLimits(rpm=600)).counts_tokens()
    assert Limiter(LaneLimits(tpm=600)).counts_tokens() and Limiter(LaneLimits(input_tpm=600)).counts_tokens()
    learning = Limiter(LaneLimits())
    assert not learning.counts_tokens()
    learning.release(await learning.acquire(0, 0), rate=RateLimitInfo(limit_requests=600, limit_tokens=10_000))
    assert learning.counts_tokens()


async def test_usage_corrects_reservations() -> None:
    clock = FakeClock()
    # Anthropic: the output reservation (max_tokens) is corrected to the actual output.
    refunding = Limiter(LaneLimits(output_tpm=6000, refund_output=True), learn=False, clock=clock)  # capacity 50
    ticket = await refunding.acquire(0, 50)
    waiting = await started(refunding, 0, 40)
    assert not waiting.done()
    refunding.release(ticket, usage=Usage(input_tokens=10, output_tokens=5))
    await asyncio.wait_for(waiting, 5)

    # OpenAI: max_tokens stays counted; only the input is corrected to what was actually counted.
    keeping = Limiter(LaneLimits(tpm=6000), learn=False, clock=clock)  # capacity 50
    ticket = await keeping.acquire(20, 30)
    waiting = await started(keeping, 0, 25)
    assert not waiting.done()
    keeping.release(ticket, usage=Usage(input_tokens=10, output_tokens=5))  # 10 back, not 35
    assert not waiting.done()
    await cancel(waiting)
    assert (await started(keeping, 0, 10)).done()


async def test_a_request_larger_than_the_capacity_still_passes() -> None:
    limiter = Limiter(LaneLimits(tpm=600_000), learn=False)  # 10,000 tokens/s, capacity 5,000
    loop = asyncio.get_running_loop()
    big = await started(limiter, 10_000, 0)
    assert big.done()  # admitted at once into debt
    start = loop.time()
    after = await started(limiter, 100, 0)
    assert not after.done()
    await asyncio.wait_for(after, 5)
    waited = loop.time() - start
    print(f"waited {waited:.3f} s to pay back the debt")
    assert waited >= 0.4


async def test_acquire_release_is_cheap() -> None:
    unlimited = Limiter(LaneLimits(), learn=False)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(5000):
        unlimited.release(await unlimited.acquire(100, 100), usage=Usage(90, 50))
    print(f"5,000 unlimited acquire/release pairs: {time.process_time() - cpu:.3f} s CPU")

    paced = Limiter(LaneLimits(rpm=240_000, tpm=100_000_000), learn=False)  # 4,000 requests/s
    cpu, wall = time.process_time(), time.perf_counter()
    times = await _run_paced(paced, 4000, 100, 100)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"4,000 paced acquires at 4,000/s: {wall:.3f} s wall, {cpu:.3f} s CPU ({cpu / 4000 * 1e6:.0f} µs each)")
    assert len(times) == 4000


def test_nonsense_limits_are_refused_up_front() -> None:
    for bad in ({"rpm": 0}, {"tpm": -5}, {"max_in_flight": 0}, {"utilization": 1.5}):
        with pytest.raises(SpecError):
            LaneLimits(**bad)  # type: ignore[arg-type]
