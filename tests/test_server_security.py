"""The shared service holds against its own users (issue 13): prices, lane limits and caps stay the operator's,
credentials are granted, sources come from the operator, event streams are capped, a job's state goes when it
ends, the response cache is scoped, files at rest are private and provider keys encrypted, and SIGTERM stops
dispatch at once with event streams open. One `backfill serve` process goes through the checks of items 1, 3,
4, 5, 6, 11, 12 and 13 in turn, and is then stopped with SIGTERM (item 10): starting it is most of the time."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from conftest import make_rows
from test_server import FERNET_KEY, add_users, chat_spec, live_server, wait_for

from backfill.server.db import ServerDB
from backfill.server.secrets import SecretBox, new_key
from backfill.sim import KeyLimits, SimConfig, Simulator

PROVIDER_KEY = "sk-team-provider-key-0123456789abcdef"
MAX_STREAMS = 2
MAX_JOBS = 4  # so each user runs at most 2 at once by default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    url: str
    data_dir: Path
    inputs: Path
    tokens: dict[str, str]
    proc: subprocess.Popen[bytes]
    sim: Simulator

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[who]}"}, timeout=30)


def start_serve(data_dir: Path, inputs: Path, log: Path, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    args = ["serve", "--data-dir", str(data_dir), "--allow-dir", str(inputs), "--port", str(port), *extra]
    env = {**os.environ, "BACKFILL_SECRET_KEY": FERNET_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "backfill.server", *args], stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            httpx.get(f"{url}/me", timeout=1)
            return url, proc
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)


def setup_service(tmp: Path, sim: Simulator, *extra: str) -> Service:
    data_dir, inputs = tmp / "data", tmp / "inputs"
    inputs.mkdir(parents=True)
    pq.write_table(make_rows(20), inputs / "rows.parquet")
    pq.write_table(make_rows(3000), inputs / "big.parquet")
    tokens = add_users(data_dir, {"op": "operator", "alice": "user", "bob": "user"})
    url, proc = start_serve(data_dir, inputs, tmp / "server.log", *extra)
    svc = Service(url, data_dir, inputs, tokens, proc, sim)
    op = svc.client("op")
    for name, shared in (("team", False), ("shared", True), ("hidden", False)):
        body = {"name": name, "provider": "sim", "base_url": sim.base_url, "api_key": PROVIDER_KEY, "cache_shared": shared}
        assert op.post("/credentials", json=body).status_code == 201
    for name in ("team", "shared"):
        for user in ("alice", "bob"):
            assert op.put(f"/credentials/{name}/users/{user}").status_code == 200
    return svc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_one_server_holds_against_its_users(tmp_path: Path) -> None:
    with Simulator(SimConfig(default_limits=KeyLimits(rpm=60000), latency_s=0.02)) as sim:
        svc = setup_service(tmp_path, sim, "--max-streams-per-user", str(MAX_STREAMS), "--max-jobs", str(MAX_JOBS))
        try:
            check_prices_credentials_and_sources_come_from_the_operator(svc)
            check_a_users_own_limits_slow_only_their_share_and_leave_nothing(svc)
            check_caps_per_user_and_server_wide(svc)
            check_streams_capped_and_a_jobs_state_freed_when_it_ends(svc)
            check_the_response_cache_is_per_user_unless_the_operator_shares_it(svc)
            check_files_at_rest_are_private_and_keys_encrypted(svc)
            check_sigterm_stops_dispatch_at_once_with_an_event_stream_open(svc)
        finally:
            stop(svc.proc)


def submit(client: httpx.Client, spec: dict[str, Any], credential: str | None = "team", expect: int = 201) -> dict[str, Any]:
    r = client.post("/jobs", json={"spec": spec, "credential": credential})
    assert r.status_code == expect, r.text
    return r.json()


# --- items 1, 5, 6: prices, credentials and sources are the operator's ------------------------------


def check_prices_credentials_and_sources_come_from_the_operator(svc: Service) -> None:
    alice, bob, op = svc.client("alice"), svc.client("bob"), svc.client("op")
    free = chat_spec("rows.parquet", prices={"gpt-4o-mini": {"input": 0, "output": 0}})
    assert "prices" in submit(alice, free, expect=400)["detail"]
    env = chat_spec("rows.parquet")
    env["task"]["api_key_env"] = "HOME"
    assert "environment variable" in submit(alice, env, expect=400)["detail"]
    for where in ("input", "output"):
        spec = chat_spec("rows.parquet")
        spec.setdefault(where, {})["path"] = "s3://bucket/rows.parquet"
        assert "URL" in submit(alice, spec, expect=400)["detail"], where

    # a user lists and uses only what was granted, without base URLs; the operator sees all, with who has each
    mine = alice.get("/credentials").json()
    assert [(c["name"], c["base_url"], c["cache"]) for c in mine] == [("shared", None, "shared"), ("team", None, "per user")]
    assert "hidden" in submit(alice, chat_spec("rows.parquet"), credential="hidden", expect=400)["detail"]
    everything = {c["name"]: c for c in op.get("/credentials").json()}
    assert everything["hidden"]["users"] == [] and everything["team"]["users"] == ["alice", "bob"]
    assert everything["team"]["base_url"] == svc.sim.base_url

    # the server bills by the operator's table: $1000 per 1M tokens each way
    settings = op.get("/settings").json()
    r = op.put("/settings", json={**settings, "prices": {"gpt-4o-mini": {"input": 1000, "output": 1000}}})
    assert r.status_code == 200, r.text
    try:
        job = submit(bob, chat_spec("rows.parquet", prompt="priced {{ id }} {{ text }}"))
        done = wait_for(bob, job["id"], ("succeeded",))
    finally:
        op.put("/settings", json=settings)
    billed = (done["input_tokens"] + done["output_tokens"]) * 1000 / 1e6
    assert done["cost_usd"] == pytest.approx(billed, rel=1e-6)


# --- items 3, 4: lane limits and caps ---------------------------------------------------------------------


def check_a_users_own_limits_slow_only_their_share_and_leave_nothing(svc: Service) -> None:
    alice, bob, op = svc.client("alice"), svc.client("bob"), svc.client("op")
    crawl = [submit(alice, chat_spec("big.parquet", prompt=f"crawl{i} {{{{ id }}}}", limits={"rpm": 0.5}))["id"] for i in range(3)]
    for job_id in crawl[:2]:
        wait_for(alice, job_id, ("running",))
    # alice's rpm 0.5 is her jobs' own: bob's job on the same lane runs at the lane's pace
    fast = submit(bob, chat_spec("rows.parquet", prompt="fast {{ id }} {{ text }}"))
    assert wait_for(bob, fast["id"], ("succeeded",), timeout=30)["rows_ok"] == 20
    lane = next(lane for lane in op.get("/lanes").json() if crawl[0] in lane["jobs"])
    assert lane["rpm"] != 0.5 and lane["override_rpm"] is None
    # by default one user runs half of --max-jobs at once, so her third job waits, saying why
    deadline = time.monotonic() + 10
    while "2 job(s) at once" not in (alice.get(f"/jobs/{crawl[2]}").json()["reason"] or ""):
        assert time.monotonic() < deadline, alice.get(f"/jobs/{crawl[2]}").json()
        time.sleep(0.1)
    for job_id in crawl:
        alice.post(f"/jobs/{job_id}/cancel")
    for job_id in crawl:
        wait_for(alice, job_id, ("cancelled",))
    after = next(v for v in op.get("/lanes").json() if v["key"] == lane["key"])
    assert after["rpm"] != 0.5 and after["jobs"] == []


def check_caps_per_user_and_server_wide(svc: Service) -> None:
    alice, bob, op = svc.client("alice"), svc.client("bob"), svc.client("op")
    assert op.patch("/users/alice", json={"max_rows": 10, "max_attempts": 2, "max_upload_bytes": 1000}).status_code == 200
    try:
        assert "max_rows" in submit(alice, chat_spec("rows.parquet"), expect=400)["detail"]
        assert "max_attempts" in submit(alice, chat_spec("rows.parquet", retries={"max_attempts": 5}), expect=400)["detail"]
        up = alice.post("/uploads", params={"filename": "x.csv"}, content=b"id,text\n" + b"a,b\n" * 2000)
        assert up.status_code == 413 and "max_upload_bytes" in up.text
        assert not [p for p in (svc.data_dir / "uploads").rglob("*") if p.is_file()]
        assert alice.get("/me").json()["caps"]["max_rows"] == 10
        capped_not = submit(bob, chat_spec("rows.parquet", prompt="bob caps {{ id }}"))  # bob is not capped
        wait_for(bob, capped_not["id"], ("succeeded",))
    finally:
        op.patch("/users/alice", json={"max_rows": None, "max_attempts": None, "max_upload_bytes": None})
    settings = op.get("/settings").json()
    op.put("/settings", json={**settings, "max_tokens": 50, "max_chunk_size": 10})
    try:
        assert "max_tokens" in submit(bob, _with_max_tokens(100), expect=400)["detail"]
        assert "max_chunk_size" in submit(bob, _with_max_tokens(20), expect=400)["detail"]  # chunk_size 50 > 10
    finally:
        op.put("/settings", json=settings)

    # a 50 MB JSON body is refused from its Content-Length, before it is sent
    host, port = svc.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        head = f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {svc.tokens['alice']}\r\nContent-Type: application/json\r\nContent-Length: {50 * 2**20}\r\n\r\n"
        s.sendall(head.encode())
        s.settimeout(10)
        assert s.recv(200).startswith(b"HTTP/1.1 413")
    # and one without a length is cut off once past the cap, not read to its end
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"spec": {"x": "'
        for _ in range(50):
            sent += 2**20
            yield b"x" * 2**20
        yield b'"}}'

    try:
        r = alice.post("/jobs", content=body(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.text
    except httpx.TransportError:
        pass  # the server answered 413 and closed while the client was still sending
    assert sent < 50 * 2**20 or r.status_code == 413


def _with_max_tokens(n: int) -> dict[str, Any]:
    spec = chat_spec("rows.parquet", prompt=f"mt{n} {{{{ id }}}}")
    spec["task"]["params"]["max_tokens"] = n
    return spec


# --- items 11, 12: streams capped, a job's state freed; the cache is scoped ---------------------------------


def check_streams_capped_and_a_jobs_state_freed_when_it_ends(svc: Service) -> None:
    alice, op = svc.client("alice"), svc.client("op")
    slow = submit(alice, chat_spec("big.parquet", prompt="stream {{ id }}", limits={"rpm": 0.5}))["id"]
    wait_for(alice, slow, ("running",))
    with alice.stream("GET", f"/jobs/{slow}/events") as one, alice.stream("GET", f"/jobs/{slow}/events") as two:
        assert one.status_code == two.status_code == 200
        over = alice.get(f"/jobs/{slow}/events")
        assert over.status_code == 429 and "event streams" in over.text
    deadline = time.monotonic() + 10
    while True:  # closed streams are given back
        with alice.stream("GET", f"/jobs/{slow}/events") as again:
            if again.status_code == 200:
                break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    alice.post(f"/jobs/{slow}/cancel")
    wait_for(alice, slow, ("cancelled",))
    quick = submit(alice, chat_spec("rows.parquet", prompt="quick {{ id }} {{ text }}"))["id"]
    wait_for(alice, quick, ("succeeded",))
    metrics = op.get("/metrics").text
    assert f'job="{slow}"' not in metrics and f'job="{quick}"' not in metrics
    assert all(slow not in lane["jobs"] and quick not in lane["jobs"] for lane in op.get("/lanes").json())


def check_the_response_cache_is_per_user_unless_the_operator_shares_it(svc: Service) -> None:
    alice, bob = svc.client("alice"), svc.client("bob")
    spec = chat_spec("rows.parquet", prompt="cache {{ id }} {{ text }}")
    first = wait_for(alice, submit(alice, spec)["id"], ("succeeded",))
    assert first["requests_sent"] == 20
    again = wait_for(alice, submit(alice, spec)["id"], ("succeeded",))
    assert again["requests_sent"] == 0  # her own answers serve her again
    other = wait_for(bob, submit(bob, spec)["id"], ("succeeded",))
    assert other["requests_sent"] == 20 and other["cost_usd"] > 0  # bob neither gets hers nor learns she asked

    wait_for(alice, submit(alice, spec, credential="shared")["id"], ("succeeded",))
    team = wait_for(bob, submit(bob, spec, credential="shared")["id"], ("succeeded",))
    assert team["requests_sent"] == 0  # the operator shared this credential's cache


# --- item 13: files at rest ----------------------------------------------------------------------------------


def check_files_at_rest_are_private_and_keys_encrypted(svc: Service) -> None:
    alice = svc.client("alice")
    up = alice.post("/uploads", params={"filename": "mine.csv"}, content=b"id,text\n1,a\n")
    assert up.status_code == 201
    wait_for(alice, submit(alice, chat_spec("rows.parquet", prompt="disk {{ id }} {{ text }}"))["id"], ("succeeded",))
    paths = [svc.data_dir, *svc.data_dir.rglob("*")]
    assert any(p.name == "backfill.db" for p in paths) and any("uploads" in p.parts for p in paths if p.is_file())
    loose = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o077]
    assert not loose, loose
    raw = b"".join(p.read_bytes() for p in svc.data_dir.glob("server.db*"))
    assert PROVIDER_KEY.encode() not in raw and b"gAAAA" in raw  # a Fernet token


def test_no_secret_key_no_stored_provider_key_and_rotation(tmp_path: Path) -> None:
    with live_server(tmp_path / "nokey", secret_keys=[]) as live:
        r = live.client("op").post("/credentials", json={"name": "k", "provider": "openai", "api_key": PROVIDER_KEY})
        assert r.status_code == 400 and "BACKFILL_SECRET_KEY" in r.json()["detail"]

    data = tmp_path / "rot"
    new = new_key()
    env = {**os.environ, "BACKFILL_SECRET_KEY": FERNET_KEY, "TEAM_KEY": PROVIDER_KEY}

    def cli(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "backfill.server", *args, "--data-dir", str(data)], capture_output=True, text=True, env={**env, **(extra or {})}, timeout=60)
        assert done.returncode == 0, done.stderr
        return done

    add_users(data, {"carol": "user"})
    cli("credentials", "add", "team", "--provider", "openai", "--key-env", "TEAM_KEY", "--shared-cache", "--grant", "carol")
    cli("credentials", "rotate-key", extra={"BACKFILL_SECRET_KEY": f"{new},{FERNET_KEY}"})
    assert PROVIDER_KEY.encode() not in b"".join(p.read_bytes() for p in data.glob("server.db*"))
    db = ServerDB(data / "server.db", box=SecretBox([new]))
    try:
        cred = db.get_credential("team")
        assert cred is not None and cred.api_key == PROVIDER_KEY and cred.cache_shared
        assert db.grantees("team") == ["carol"]
    finally:
        db.close()
    with pytest.raises(Exception, match="decrypted"):
        ServerDB(data / "server.db", box=SecretBox([FERNET_KEY])).get_credential("team")


def test_uploads_past_their_retention_are_deleted(tmp_path: Path) -> None:
    with live_server(tmp_path / "data", sweep_every_s=0.1) as live:
        op, alice = live.client("op"), live.client("alice")
        kept = alice.post("/uploads", params={"filename": "old.csv"}, content=b"id,text\n1,a\n").json()
        path = next((live.data_dir / "uploads" / "alice").glob(f"{kept['upload_id']}-*"))
        assert op.put("/settings", json={"upload_retention_days": 1e-6}).status_code == 200  # about 0.1 s
        deadline = time.monotonic() + 10
        while path.exists():
            assert time.monotonic() < deadline, "the upload outlived its retention"
            time.sleep(0.05)
        gone = alice.post("/jobs", json={"spec": chat_spec(), "upload_id": kept["upload_id"]})
        assert gone.status_code == 404


# --- item 10: SIGTERM with an event stream open -------------------------------------------------------------


def check_sigterm_stops_dispatch_at_once_with_an_event_stream_open(service: Service) -> None:
    sim = service.sim
    alice = service.client("alice")
    spec = chat_spec("big.parquet", prompt="term {{ id }}", limits={"rpm": 600, "max_in_flight": 4})
    job_id = submit(alice, spec)["id"]
    wait_for(alice, job_id, ("running",))
    lines: list[str] = []

    def listen() -> None:
        try:
            with httpx.stream("GET", f"{service.url}/jobs/{job_id}/events", headers={"Authorization": f"Bearer {service.tokens['alice']}"}, timeout=60) as s:
                lines.extend(s.iter_lines())
        except httpx.TransportError:
            lines.append("<closed>")

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    start = len(sim.log.entries)
    while len(sim.log.entries) < start + 10 or not lines:
        time.sleep(0.05)
    service.proc.send_signal(signal.SIGTERM)
    at_signal = len(sim.log.entries)
    service.proc.wait(15)  # uvicorn alone would wait 20 s for the open stream, dispatching all along
    listener.join(10)
    assert not listener.is_alive()  # the stream was closed
    after = len(sim.log.entries) - at_signal
    assert after <= 4, f"{after} requests reached the provider after SIGTERM (4 were in flight at most)"
    db = ServerDB(service.data_dir / "server.db")
    try:
        job = db.get_job(job_id)
        assert job is not None and job.status == "queued"  # it resumes when the server is back
    finally:
        db.close()
