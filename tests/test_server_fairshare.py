"""Fair share of one lane between users, read from the simulator's own request log.

Both users' jobs run on the same credential and model (one lane) limited to R requests/min. Each user's
requests carry a different max_tokens, which the simulator logs as `charged_tokens - prompt_tokens`, so
its log tells whose request each entry was. Over the time both users' requests arrive, equal weights
split the lane half and half, and weights 3:1 three quarters to one quarter, each within ±10%.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from conftest import make_rows
from test_server import live_server

from backfill.sim import KeyLimits, SimConfig, Simulator

RPM = 2400  # 40 requests/s: enough requests for a tight ratio in a few seconds
ROWS = 160
MAX_TOKENS = {"alice": 20, "bob": 21}


async def wait_done(client: httpx.AsyncClient, job_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = (await client.get(f"/jobs/{job_id}")).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stayed {job['status']}"
        await asyncio.sleep(0.2)


def shares_while_both_ran(entries: list[Any]) -> dict[str, int]:
    """Requests per user in the window from when both users' requests arrive to when the first stops."""
    owner = {v: k for k, v in MAX_TOKENS.items()}
    times: dict[str, list[float]] = {"alice": [], "bob": []}
    for e in entries:
        if e.status == 200 and e.admitted:
            times[owner[e.charged_tokens - e.prompt_tokens]].append(e.t)
    start = max(min(t) for t in times.values())
    end = min(max(t) for t in times.values())
    assert end - start > 2, f"the users' jobs overlapped only {end - start:.1f} s"
    return {user: sum(1 for x in t if start <= x <= end) for user, t in times.items()}


@pytest.mark.parametrize("weights,alice_share", [((1, 1), 0.5), ((3, 1), 0.75)], ids=["equal", "3to1"])
async def test_lane_split_follows_user_weights(tmp_path: Path, weights: tuple[int, int], alice_share: float) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(make_rows(ROWS), inputs / "rows.parquet")
    config = SimConfig(default_limits=KeyLimits(rpm=RPM), latency_s=0.05)
    async with Simulator(config) as sim:
        with live_server(tmp_path / "data", allow_dirs=[inputs]) as live:
            async with live.aclient("op") as op, live.aclient("alice") as alice, live.aclient("bob") as bob:
                r = await op.post("/credentials", json={"name": "team", "provider": "sim", "base_url": sim.base_url, "api_key": "team-key"})
                assert r.status_code == 201
                for user, weight in zip(("alice", "bob"), weights):
                    assert (await op.put(f"/credentials/team/users/{user}")).status_code == 200
                    assert (await op.patch(f"/users/{user}", json={"weight": weight})).status_code == 200
                jobs = {}
                for user, client in (("alice", alice), ("bob", bob)):
                    spec = {
                        "input": {"path": "rows.parquet", "id_column": "id"},
                        "task": {"model": "gpt-4o-mini", "prompt": user + " {{ id }}: {{ text }}", "params": {"max_tokens": MAX_TOKENS[user]}},
                        "limits": {"rpm": RPM, "max_in_flight": 64},
                        "chunk_size": 20,
                    }
                    r = await client.post("/jobs", json={"spec": spec, "credential": "team"})
                    assert r.status_code == 201, r.text
                    jobs[user] = (client, r.json()["id"])
                for client, job_id in jobs.values():
                    assert (await wait_done(client, job_id))["status"] == "succeeded"
                lanes = (await op.get("/lanes")).json()
        entries = list(sim.log.entries)

    assert len(lanes) == 1 and lanes[0]["requests_total"] == 2 * ROWS  # one lane, shared
    counts = shares_while_both_ran(entries)
    share = counts["alice"] / (counts["alice"] + counts["bob"])
    assert abs(share - alice_share) <= 0.1 * alice_share, (counts, share)
    assert sim.log.count_by_status().get(429, 0) == 0
