"""How fast the simulator serves: requests/s and sim CPU per 1,000 requests, against a bare aiohttp baseline.

The sim runs in its own process (`python -m backfill.sim`, zero latency, no limits unless a scenario
sets them); this process is the load generator (one aiohttp session, many keep-alive connections).
The baseline is an aiohttp low-level server answering a fixed JSON body, measured the same way; both
servers and the load generator run on uvloop.
Run: .venv/bin/python bench/bench_sim.py [--seconds 3] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil

from common import use_uvloop

_BASELINE = r"""
import asyncio, sys
import uvloop
from aiohttp import web
BODY = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}]}'
async def handle(request):
    await request.read()
    return web.Response(body=BODY, content_type="application/json")
async def main():
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())  # the sim runs on uvloop (backfill.loop), so its baseline does too
"""

_PROMPT = "Classify the sentiment of this review of a blue kettle: it boils fast, is quiet, and the lid is sturdy."
_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 60},
    },
    "required": ["sentiment", "score", "summary"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    sim_args: tuple[str, ...] = ()


def scenarios() -> list[Scenario]:
    openai = {"Authorization": "Bearer sk-bench"}
    anthropic = {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": _PROMPT}], "max_tokens": 200}
    return [
        Scenario("chat (text)", "/v1/chat/completions", openai, chat),
        Scenario(
            "chat (json_schema)",
            "/v1/chat/completions",
            openai,
            {
                **chat,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "out", "schema": _SCHEMA, "strict": True},
                },
            },
        ),
        Scenario(
            "chat, rpm+tpm limits",
            "/v1/chat/completions",
            openai,
            chat,
            ("--rpm", "100000000", "--tpm", "100000000000"),
        ),
        Scenario(
            "anthropic messages",
            "/v1/messages",
            anthropic,
            {"model": "claude-haiku-4-5", "max_tokens": 200, "messages": [{"role": "user", "content": _PROMPT}]},
        ),
        Scenario(
            "embeddings (1 input)", "/v1/embeddings", openai, {"model": "text-embedding-3-small", "input": _PROMPT}
        ),
    ]


def start(cmd: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = next(word for word in line.split() if word.startswith("http://"))
    return proc, url


async def load(url: str, scenario: Scenario, seconds: float, concurrency: int) -> tuple[int, float, int]:
    """Hammer `url` for `seconds`; returns (200 responses, elapsed seconds, other responses)."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    ok = other = 0
    # Vary the prompt so answers are not all one cached string on either side.
    bodies = []
    for i in range(256):
        body = dict(scenario.body)
        if "messages" in body:
            body["messages"] = [{"role": "user", "content": f"{_PROMPT} #{i}"}]
        else:
            body["input"] = f"{_PROMPT} #{i}"
        bodies.append(body)
    async with aiohttp.ClientSession(connector=connector, headers=scenario.headers) as session:

        async def warm() -> None:
            async with session.post(url + scenario.path, json=bodies[0]) as r:
                await r.read()

        await asyncio.gather(*(warm() for _ in range(concurrency)))
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker(n: int) -> None:
            nonlocal ok, other
            i = n
            while time.perf_counter() < deadline:
                async with session.post(url + scenario.path, json=bodies[i % len(bodies)]) as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                    else:
                        other += 1
                i += concurrency

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        return ok, time.perf_counter() - started, other


def measure(cmd: list[str], scenario: Scenario, seconds: float, concurrency: int) -> tuple[float, float, int]:
    """(requests/s, server CPU s per 1,000 requests, non-200 count) for one server process."""
    proc, url = start(cmd)
    try:
        server = psutil.Process(proc.pid)
        asyncio.run(load(url, scenario, 0.3, concurrency))
        before = server.cpu_times()
        ok, elapsed, other = asyncio.run(load(url, scenario, seconds, concurrency))
        after = server.cpu_times()
    finally:
        proc.terminate()
        proc.wait()
    cpu = (after.user - before.user) + (after.system - before.system)
    total = ok + other
    return total / elapsed, cpu / total * 1000, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    use_uvloop()
    sim = [sys.executable, "-m", "backfill.sim", "--port", "0"]
    base_rps, base_cpu, _ = measure([sys.executable, "-c", _BASELINE], scenarios()[0], args.seconds, args.concurrency)
    print(f"{'scenario':<24}{'req/s':>9}{'CPU s/1k req':>14}{'x baseline':>12}{'capacity/core':>15}{'non-200':>9}")
    print(f"{'bare aiohttp (baseline)':<24}{base_rps:>9.0f}{base_cpu:>14.3f}{1.0:>12.2f}{1000 / base_cpu:>15.0f}{0:>9}")
    for scenario in scenarios():
        rps, cpu, other = measure([*sim, *scenario.sim_args], scenario, args.seconds, args.concurrency)
        print(f"{scenario.name:<24}{rps:>9.0f}{cpu:>14.3f}{cpu / base_cpu:>12.2f}{1000 / cpu:>15.0f}{other:>9}")
    print("capacity/core = 1000 / (CPU s per 1k requests): requests/s the sim could serve on one busy core.")


if __name__ == "__main__":
    main()
