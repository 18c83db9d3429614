"""Faults on demand: rates as configured, reproducible by seed yet retryable; outages; the concurrency cap."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from backfill.sim import Faults, KeyLimits, Outage, SimConfig, Simulator

OPENAI = {"Authorization": "Bearer sk-faults"}
ANTHROPIC = {"x-api-key": "sk-faults", "anthropic-version": "2023-06-01"}


def chat(i: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": 200}


def message(i: int) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": f"row {i}"}]}


async def outcome(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> str:
    """What the client saw: the status, "reset", "malformed", "length" or "timeout"."""
    try:
        async with session.post(url, json=body, headers=headers) as r:
            raw = await r.read()
            if r.status != 200:
                return str(r.status)
            try:
                payload = json.loads(raw)
            except ValueError:
                return "malformed"
            finish = payload["choices"][0]["finish_reason"] if "choices" in payload else payload["stop_reason"]
            return "length" if finish in ("length", "max_tokens") else "200"
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientError:
        return "reset"


async def run_many(url: str, make_body, headers: dict, n: int, timeout: float | None = None) -> list[str]:
    limit = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(i: int) -> str:
            async with limit:
                return await outcome(session, url, make_body(i), headers)

        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_fault_rates_are_observed_within_tolerance() -> None:
    faults = Faults(error_500=0.2, error_503=0.1, reset=0.1, malformed=0.1, truncate=0.1)
    async with Simulator(SimConfig(faults=faults, seed=7)) as sim:
        seen = await run_many(sim.base_url + "/chat/completions", chat, OPENAI, 600)
        events = sim.log.count_by_event()
    n = len(seen)
    expected = {"500": 0.2, "503": 0.1, "reset": 0.1, "malformed": 0.1, "length": 0.1, "200": 0.4}
    for name, rate in expected.items():
        assert abs(seen.count(name) / n - rate) <= 0.05, (name, seen.count(name))
    assert events["reset"] == seen.count("reset") and events["malformed"] == seen.count("malformed")
    assert sim.log.count_by_status()[0] == seen.count("reset")


async def test_529_is_anthropic_overloaded_and_503_on_openai() -> None:
    async with Simulator(SimConfig(faults=Faults(error_529=0.3), seed=1)) as sim:
        seen = await run_many(sim.url + "/v1/messages", message, ANTHROPIC, 300)
        assert abs(seen.count("529") / 300 - 0.3) <= 0.06
        async with aiohttp.ClientSession() as session:
            statuses = set()
            for i in range(40):
                async with session.post(sim.base_url + "/chat/completions", json=chat(i), headers=OPENAI) as r:
                    statuses.add(r.status)
                    if r.status != 200:
                        assert (await r.json())["error"]["type"] == "server_error"
                        assert "x-ratelimit-remaining-requests" not in r.headers  # no limits configured
            assert statuses == {200, 503}
            for i in range(40):
                async with session.post(sim.url + "/v1/messages", json=message(i), headers=ANTHROPIC) as r:
                    if r.status == 529:
                        assert (await r.json())["error"]["type"] == "overloaded_error"


async def test_faults_reproducible_by_seed_but_a_retry_can_succeed() -> None:
    async def statuses(seed: int) -> list[str]:
        async with Simulator(SimConfig(faults=Faults(error_500=0.5), seed=seed)) as sim:
            async with aiohttp.ClientSession() as session:
                return [await outcome(session, sim.base_url + "/chat/completions", chat(i), OPENAI) for i in range(40)]

    assert await statuses(3) == await statuses(3)
    assert await statuses(3) != await statuses(4)
    async with Simulator(SimConfig(faults=Faults(error_500=0.5), seed=3)) as sim:
        async with aiohttp.ClientSession() as session:
            tries = [await outcome(session, sim.base_url + "/chat/completions", chat(0), OPENAI) for _ in range(20)]
    assert "500" in tries and "200" in tries  # the same request fails and succeeds


async def test_hangs_outlast_the_client_timeout() -> None:
    config = SimConfig(faults=Faults(hang=0.5, hang_s=0.4), seed=2)
    sim = Simulator(config)
    await sim.start()
    try:
        seen = await run_many(sim.base_url + "/chat/completions", chat, OPENAI, 40, timeout=0.15)
    finally:
        await sim.close()  # lets the held requests finish, so each is in the log
    hung = [e for e in sim.log.entries if e.event == "hang"]
    assert 8 <= len(hung) <= 32
    assert seen.count("timeout") == len(hung)
    assert all(e.latency_s >= 0.4 for e in hung)


async def test_scheduled_outages_refuse_only_during_their_window() -> None:
    outages = [Outage(0.3, 0.6, 429), Outage(0.8, 1.0, 503)]
    async with Simulator(SimConfig(outages=outages)) as sim:
        async with aiohttp.ClientSession() as session:
            i = 0
            while sim.log.entries == [] or sim.log.entries[-1].t < 1.2:
                async with session.post(sim.base_url + "/chat/completions", json=chat(i), headers=OPENAI) as r:
                    await r.read()
                    if r.status == 429:
                        assert int(r.headers["retry-after"]) >= 1
                i += 1
    for e in sim.log.entries:
        expected = 429 if 0.3 <= e.t < 0.6 else 503 if 0.8 <= e.t < 1.0 else 200
        assert e.status == expected, e
    assert sim.log.count_by_status().keys() == {200, 429, 503}


async def test_concurrency_cap_queues_requests() -> None:
    config = SimConfig(max_concurrency=2, latency_s=0.2, ttft_s=0.2, latency_sigma=0)
    async with Simulator(config) as sim:
        seen = await run_many(sim.base_url + "/chat/completions", chat, OPENAI, 6)
        assert seen == ["200"] * 6
        latencies = sorted(e.latency_s for e in sim.log.entries)
    # Two at a time, 0.2 s each: the k-th pair waits for the ones before it.
    for i, latency in enumerate(latencies):
        assert latency >= 0.2 * (i // 2 + 1) - 0.02, latencies


@pytest.mark.parametrize(
    "path, body, headers",
    [
        ("/v1/chat/completions", chat(0), OPENAI),
        ("/v1/messages", message(0), ANTHROPIC),
    ],
)
async def test_quota_exhausted_key(path: str, body: dict, headers: dict) -> None:
    config = SimConfig(keys={"sk-faults": KeyLimits(rpm=100, quota_exhausted=True)})
    async with Simulator(config) as sim:
        async with aiohttp.ClientSession() as session:
            async with session.post(sim.url + path, json=body, headers=headers) as r:
                error = (await r.json())["error"]
                if path == "/v1/messages":
                    assert r.status == 400 and "credit balance" in error["message"]
                else:
                    assert r.status == 429 and error["code"] == "insufficient_quota"
                    assert "retry-after" not in r.headers
    assert sim.log.entries[0].event == "quota" and not sim.log.entries[0].admitted
