"""Rate limits: admitted requests and tokens stay within limit + burst; headers count down and reset."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import aiohttp
import pytest

from backfill.sim import KeyLimits, SimConfig, Simulator
from backfill.sim.ratelimit import format_duration
from backfill.tokens import count_messages

KEY = "sk-limits"
OPENAI = {"Authorization": f"Bearer {KEY}"}
ANTHROPIC = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


def chat(i: int = 0, max_tokens: int = 30) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"row {i}"}], "max_tokens": max_tokens}


def message(i: int = 0, max_tokens: int = 100) -> dict:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"row {i}"}],
    }


async def hammer(url: str, headers: dict, make_body, seconds: float, workers: int = 16) -> list[int]:
    """Send requests from `workers` concurrent loops for `seconds`; returns the statuses."""
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(headers=headers) as session:

        async def loop(w: int) -> None:
            i = w
            while time.monotonic() < deadline:
                async with session.post(url, json=make_body(i)) as r:
                    await r.read()
                    statuses.append(r.status)
                    if r.status == 429:
                        assert "retry-after" in r.headers
                        # A polite client would wait; a brief pause keeps the hammering from starving the loop.
                        await asyncio.sleep(0.005)
                i += workers

        await asyncio.gather(*(loop(w) for w in range(workers)))
    return statuses


@pytest.mark.parametrize("burst_s", [1.0, 2.0])
async def test_requests_per_minute_never_exceeded(burst_s: float) -> None:
    rpm = 1200.0  # 20/s
    config = SimConfig(keys={KEY: KeyLimits(rpm=rpm)}, burst_s=burst_s)
    async with Simulator(config) as sim:
        statuses = await hammer(sim.base_url + "/chat/completions", OPENAI, chat, 3.0)
        rate, capacity = rpm / 60, rpm * burst_s / 60
        for window in (0.5, 1.0, 3.0):
            peak = sim.log.peak_window(window)
            assert peak.requests <= capacity + rate * window + 1e-9, (window, peak)
        admitted = statuses.count(200)
        assert statuses.count(429) > admitted  # the client really pushed past the limit
        assert admitted >= 0.9 * rate * 3.0  # and the limit was still served nearly in full
        assert admitted == sum(1 for e in sim.log.entries if e.admitted)


async def test_openai_tokens_per_minute_counts_prompt_plus_max_tokens() -> None:
    tpm = 12_000.0  # 200 tokens/s; each request costs its prompt (~9) + max_tokens (40)
    config = SimConfig(keys={KEY: KeyLimits(rpm=None, tpm=tpm)})
    async with Simulator(config) as sim:
        await hammer(sim.base_url + "/chat/completions", OPENAI, lambda i: chat(i, 40), 3.0)
        entries = [e for e in sim.log.entries if e.admitted]
        assert entries and all(e.charged_tokens == e.prompt_tokens + 40 for e in entries)
        for window in (0.5, 1.0, 3.0):
            peak = sim.log.peak_window(window)
            assert peak.tokens <= tpm / 60 + tpm / 60 * window, (window, peak)
        assert sum(e.charged_tokens for e in entries) >= 0.85 * tpm / 60 * 3.0


async def test_anthropic_output_tokens_reserved_then_corrected() -> None:
    limits = KeyLimits(rpm=6000, input_tpm=600_000, output_tpm=60_000)  # output bucket holds 1000
    async with Simulator(SimConfig(keys={KEY: limits}, output_tokens_mean=20, output_tokens_sigma=0)) as sim:
        async with aiohttp.ClientSession(headers=ANTHROPIC) as session:
            async with session.post(sim.url + "/v1/messages", json=message(0, 900)) as r:
                body = await r.json()
                remaining = int(r.headers["anthropic-ratelimit-output-tokens-remaining"])
                assert r.headers["anthropic-ratelimit-output-tokens-limit"] == "60000"
            used = body["usage"]["output_tokens"]
            assert used == 20
            # 900 were reserved at admission; the answer used 20, so 880 came back.
            assert 1000 - used - 5 <= remaining <= 1000
            # While 900 are reserved, a second request of 900 does not fit; after correction it does.
            async with session.post(sim.url + "/v1/messages", json=message(1, 900)) as r:
                assert r.status == 200
            async with session.post(sim.url + "/v1/messages", json=message(2, 2000)) as r:
                assert r.status == 429 and "retry-after" in r.headers


async def test_openai_headers_count_down_and_reset() -> None:
    config = SimConfig(keys={KEY: KeyLimits(rpm=60, tpm=60_000)}, burst_s=5.0)  # holds 5 requests, refills 1/s
    async with Simulator(config) as sim:
        async with aiohttp.ClientSession(headers=OPENAI) as session:
            remaining = []
            for i in range(5):
                async with session.post(sim.base_url + "/chat/completions", json=chat(i)) as r:
                    assert r.status == 200
                    assert r.headers["x-ratelimit-limit-requests"] == "60"
                    assert r.headers["x-ratelimit-limit-tokens"] == "60000"
                    remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
                    reset = parse_duration(r.headers["x-ratelimit-reset-requests"])
                    assert i + 0.9 <= reset <= i + 1.0  # i+1 requests used, each refills in 1 s
                    tokens_left = int(r.headers["x-ratelimit-remaining-tokens"])
                    assert tokens_left <= 5000 - (i + 1) * (count_messages(chat(i)["messages"]) + 30) + 10
            assert remaining == [4, 3, 2, 1, 0]
            async with session.post(sim.base_url + "/chat/completions", json=chat(9)) as r:
                assert r.status == 429
                error = (await r.json())["error"]
                assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
                assert r.headers["retry-after"] == "1"
                wait_ms = int(r.headers["retry-after-ms"])
                assert 900 <= wait_ms <= 1000
                assert r.headers["x-ratelimit-remaining-requests"] == "0"
            await asyncio.sleep(wait_ms / 1000)  # the provider said when; honour it
            async with session.post(sim.base_url + "/chat/completions", json=chat(10)) as r:
                assert r.status == 200


async def test_anthropic_headers_are_rfc3339_and_count_down() -> None:
    config = SimConfig(keys={KEY: KeyLimits(rpm=60, input_tpm=60_000, output_tpm=60_000)}, burst_s=3.0)
    async with Simulator(config) as sim:
        async with aiohttp.ClientSession(headers=ANTHROPIC) as session:
            seen = []
            for i in range(4):
                async with session.post(sim.url + "/v1/messages", json=message(i)) as r:
                    seen.append((r.status, r.headers.get("anthropic-ratelimit-requests-remaining")))
                    reset = datetime.strptime(r.headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
                    ahead = reset.replace(tzinfo=UTC).timestamp() - time.time()
                    assert -1 <= ahead <= 5
                    if r.status == 429:
                        assert (await r.json())["error"]["type"] == "rate_limit_error"
                        assert int(r.headers["retry-after"]) >= 1
            assert seen == [(200, "2"), (200, "1"), (200, "0"), (429, "0")]


async def test_request_larger_than_the_limit_is_refused_without_retry_after() -> None:
    async with Simulator(SimConfig(keys={KEY: KeyLimits(tpm=1000)})) as sim:
        async with aiohttp.ClientSession(headers=OPENAI) as session:
            async with session.post(sim.base_url + "/chat/completions", json=chat(0, 5000)) as r:
                assert r.status == 429 and "retry-after" not in r.headers
                assert "Request too large" in (await r.json())["error"]["message"]


async def test_limits_are_per_key_and_model() -> None:
    config = SimConfig(keys={KEY: KeyLimits(rpm=60), "sk-other": KeyLimits(rpm=60)})
    async with Simulator(config) as sim:
        async with aiohttp.ClientSession() as session:
            statuses = []
            for key, model in [
                (KEY, "gpt-4o-mini"),
                (KEY, "gpt-4o-mini"),
                ("sk-other", "gpt-4o-mini"),
                (KEY, "gpt-4o"),
            ]:
                body = {**chat(), "model": model}
                async with session.post(
                    sim.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as r:
                    statuses.append(r.status)
            assert statuses == [200, 429, 200, 200]


def parse_duration(text: str) -> float:
    """Inverse of OpenAI's duration format, for the assertions above."""
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    total, number = 0.0, ""
    for ch in text:
        if ch in "hms":
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
        else:
            number += ch
    return total


def test_duration_format() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.12) == "120ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"
    assert parse_duration(format_duration(83.25)) == 83.25
