"""Webhooks: deliveries are independent (a hanging receiver delays nobody), reach only public addresses
unless the operator allowed a network, and their log is visible to the job's owner and operators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from backfill.server import auth
from backfill.server.db import ServerDB
from backfill.server.webhooks import Webhooks, refused_reason


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[int, dict[str, asyncio.Event], asyncio.Event]]:
    """A local receiver: /ok answers 200, /hang never answers (until the test ends); each path's event is set on arrival."""
    arrived = {"ok": asyncio.Event(), "hang": asyncio.Event()}
    release = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        arrived["ok"].set()
        return web.Response(text="ok")

    async def hang(request: web.Request) -> web.Response:
        arrived["hang"].set()
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.add_routes([web.post("/ok", ok), web.post("/hang", hang)])
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, arrived, release
    finally:
        release.set()
        await runner.cleanup()


@asynccontextmanager
async def sender(tmp_path: Path, allow: list[str]) -> AsyncIterator[tuple[ServerDB, Webhooks]]:
    db = ServerDB(tmp_path / "server.db")
    auth.add_user(db, "alice", "user")
    hooks = Webhooks(db, backoff_s=60, max_attempts=3, timeout_s=30, allow=allow)
    task = asyncio.create_task(hooks.run())
    try:
        yield db, hooks
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        db.close()


async def test_a_hanging_receiver_delays_no_other_delivery(tmp_path: Path) -> None:
    async with receiver() as (port, arrived, _), sender(tmp_path, ["127.0.0.0/8"]) as (db, hooks):
        hooks.notify("job-slow", "alice", f"http://127.0.0.1:{port}/hang", "job.succeeded", {"id": "job-slow"})
        await asyncio.wait_for(arrived["hang"].wait(), 10)
        hooks.notify("job-fast", "alice", f"http://127.0.0.1:{port}/ok", "job.succeeded", {"id": "job-fast"})
        # The hanging one holds its connection for its whole 30 s timeout; the other must not wait for it.
        await asyncio.wait_for(arrived["ok"].wait(), 10)
        for _ in range(100):
            if db.job_deliveries("job-fast")[0].done:
                break
            await asyncio.sleep(0.01)
        [fast], [slow] = db.job_deliveries("job-fast"), db.job_deliveries("job-slow")
    assert fast.done and fast.last_error is None and fast.attempts == 1
    assert not slow.done and slow.attempts == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_an_internal_address_is_refused_unless_its_network_is_allowed(tmp_path: Path, host: str) -> None:
    async with receiver() as (port, arrived, _):
        async with sender(tmp_path / "refused", []) as (db, hooks):
            hooks.notify("job-1", "alice", f"http://{host}:{port}/ok", "job.succeeded", {"id": "job-1"})
            for _ in range(500):
                if db.job_deliveries("job-1")[0].done:
                    break
                await asyncio.sleep(0.01)
            [refused] = db.job_deliveries("job-1")
        assert refused.done and not arrived["ok"].is_set()
        assert refused.last_error is not None and "127.0.0.1 is not public" in refused.last_error
        assert "--webhook-allow" in refused.last_error
        async with sender(tmp_path / "allowed", ["127.0.0.1/32"]) as (db, hooks):
            hooks.notify("job-1", "alice", f"http://{host}:{port}/ok", "job.succeeded", {"id": "job-1"})
            await asyncio.wait_for(arrived["ok"].wait(), 10)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200", "0.0.0.0", "224.0.0.1",
     "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "ff02::1", "::"],
)
def test_every_kind_of_internal_address_is_refused(address: str) -> None:
    assert refused_reason(address, []) is not None


def test_public_addresses_pass() -> None:
    assert refused_reason("93.184.216.34", []) is None
    assert refused_reason("2606:4700::1111", []) is None


async def test_the_delivery_log_is_the_owners_and_the_operators(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from conftest import make_rows
    from test_server import chat_spec, live_server

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(make_rows(5), inputs / "rows.parquet")
    async with receiver() as (port, arrived, _):
        with live_server(tmp_path / "data", allow_dirs=[inputs], webhook_allow=["127.0.0.0/8"]) as live:
            async with live.aclient("alice") as alice, live.aclient("bob") as bob, live.aclient("op") as op:
                job = (await alice.post("/jobs", json={"spec": chat_spec("rows.parquet"), "webhook_url": f"http://127.0.0.1:{port}/ok"})).json()
                await asyncio.wait_for(arrived["ok"].wait(), 30)
                for _ in range(200):
                    log = (await alice.get(f"/jobs/{job['id']}/deliveries")).json()
                    if log and log[0]["state"] == "delivered":
                        break
                    await asyncio.sleep(0.05)
                assert [(d["state"], d["attempts"], d["last_error"], d["next_try_at"]) for d in log] == [("delivered", 1, None, None)]
                assert (await op.get(f"/jobs/{job['id']}/deliveries")).json() == log
                assert (await bob.get(f"/jobs/{job['id']}/deliveries")).status_code == 404
