"""`backfill serve` as a real process: kill -9 it mid-job, start it again, SIGTERM it, start it again — the job
finishes with every row exactly once, and no answer is paid twice beyond those in flight at the kill."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
from conftest import make_rows

from backfill.sim import KeyLimits, SimConfig, Simulator

ROWS = 400
MAX_IN_FLIGHT = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The server's secret key (Fernet) for the provider key stored at rest.
ENV = {**os.environ, "BACKFILL_SECRET_KEY": "Xn3bq7Vt8dQ0w2m5k1Lr9sYhZc4uJpAeTgFiOoBvNlM="}


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "backfill.server", *args], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class ServerProcess:
    def __init__(self, data_dir: Path, allow: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--data-dir", str(data_dir), "--allow-dir", str(allow), "--port", str(self.port)]
        self.proc = subprocess.Popen([sys.executable, "-m", "backfill.server", *args], stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=ENV)

    async def started(self, token: str) -> None:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {token}"}) as c:
            while True:
                assert self.proc.poll() is None, "the server exited"
                try:
                    if (await c.get("/me")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                await asyncio.sleep(0.1)


async def poll(client: httpx.AsyncClient, job_id: str, until: Any, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = (await client.get(f"/jobs/{job_id}")).json()
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.1)


async def test_kill_and_sigterm_then_restart_finish_the_job_exactly_once(tmp_path: Path) -> None:
    data, allow = tmp_path / "data", tmp_path / "in"
    allow.mkdir()
    pq.write_table(make_rows(ROWS), allow / "rows.parquet")
    op = cli("users", "add", "op", "--role", "operator", "--data-dir", str(data))
    alice = cli("users", "add", "alice", "--data-dir", str(data))
    assert op.startswith("bf_") and alice.startswith("bf_")
    log = tmp_path / "server.log"
    config = SimConfig(default_limits=KeyLimits(rpm=2400), latency_s=0.1)
    async with Simulator(config) as sim:
        first = ServerProcess(data, allow, log)
        try:
            await first.started(op)
            async with httpx.AsyncClient(base_url=first.url, headers={"Authorization": f"Bearer {op}"}) as c:
                r = await c.post("/credentials", json={"name": "team", "provider": "sim", "base_url": sim.base_url, "api_key": "k"})
                assert r.status_code == 201
                assert (await c.put("/credentials/team/users/alice")).status_code == 200
            spec = {
                "input": {"path": "rows.parquet", "id_column": "id"},
                "task": {"model": "gpt-4o-mini", "prompt": "Row {{ id }}: {{ text }}", "params": {"max_tokens": 20}},
                "limits": {"rpm": 2400, "max_in_flight": MAX_IN_FLIGHT},
                "chunk_size": 20,
            }
            async with httpx.AsyncClient(base_url=first.url, headers={"Authorization": f"Bearer {alice}"}) as c:
                r = await c.post("/jobs", json={"spec": spec, "credential": "team"})
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]
                await poll(c, job_id, lambda j: j["rows_ok"] >= ROWS // 4)
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait, 10)
        finally:
            if first.proc.poll() is None:
                first.proc.kill()
        at_kill = sum(1 for e in sim.log.entries if e.status == 200)

        second = ServerProcess(data, allow, log)
        try:
            await second.started(alice)
            async with httpx.AsyncClient(base_url=second.url, headers={"Authorization": f"Bearer {alice}"}) as c:
                resumed = await poll(c, job_id, lambda j: j["status"] == "running" and j["rows_ok"] >= ROWS // 2)
                assert resumed["rows_ok"] < ROWS
            second.proc.send_signal(signal.SIGTERM)
            # the wait runs in a thread: the simulator in this loop must answer what the server drains
            # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
            assert await asyncio.to_thread(second.proc.wait, 30) in (0, -signal.SIGTERM)
            assert log.read_text().count('"server stopped"') == 1
        finally:
            if second.proc.poll() is None:
                second.proc.kill()

        third = ServerProcess(data, allow, log)
        try:
            await third.started(alice)
            async with httpx.AsyncClient(base_url=third.url, headers={"Authorization": f"Bearer {alice}"}) as c:
                job = await poll(c, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
                assert job["status"] == "succeeded", job
                out = await c.get(f"/jobs/{job_id}/output")
                assert out.status_code == 200
        finally:
            third.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(third.proc.wait, 30)
        entries = list(sim.log.entries)

    result = tmp_path / "result.parquet"
    result.write_bytes(out.content)
    table = pq.read_table(result)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(make_rows(ROWS).column("id").to_pylist())  # every row, once
    assert set(table.column("status").to_pylist()) == {"ok"}
    for rid, answer in zip(ids, table.column("output").to_pylist()):
        assert answer.startswith(f"Answer to «Row {rid}:"), (rid, answer)

    answered = Counter(e.request_hash for e in entries if e.status == 200)
    paid_twice = sum(n - 1 for n in answered.values())
    assert len(answered) == ROWS
    assert paid_twice <= MAX_IN_FLIGHT, f"{paid_twice} answers paid twice; at most {MAX_IN_FLIGHT} were in flight at the kill"
    assert 0 < at_kill < ROWS
    lines = log.read_text().splitlines()
    assert any('"job re-queued after a restart"' in line and job_id in line for line in lines)
