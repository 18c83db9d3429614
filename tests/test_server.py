"""The shared service over real HTTP: users and roles, isolation, input paths, uploads, progress, dead letters,
pause / resume / cancel, quotas, credentials that never come back, webhooks, metrics, and schemathesis."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import uvicorn
from aiohttp import web
from conftest import make_rows

from backfill.server import auth
from backfill.server.app import ServerConfig, create_app
from backfill.server.db import ServerDB
from backfill.server.webhooks import SIGNATURE_HEADER, verify

SECRET_KEY = "sk-test-SECRET-never-shown-4242"
# The server's own secret key (Fernet), which provider keys are encrypted with at rest.
FERNET_KEY = "Xn3bq7Vt8dQ0w2m5k1Lr9sYhZc4uJpAeTgFiOoBvNlM="


@dataclass
class Live:
    url: str
    data_dir: Path
    tokens: dict[str, str]

    def client(self, who: str | None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def aclient(self, who: str, timeout: float = 30) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[who]}"}, timeout=timeout)


def add_users(data_dir: Path, users: dict[str, str]) -> dict[str, str]:
    """Create users (name -> role) in a data directory; returns name -> token."""
    db = ServerDB(data_dir / "server.db")
    try:
        return {name: auth.add_user(db, name, role)[1] for name, role in users.items()}
    finally:
        db.close()


@contextmanager
def live_server(data_dir: Path, **config: Any) -> Iterator[Live]:
    """The server in a background thread (its own event loop) on an ephemeral port, with op, alice and bob."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens = add_users(data_dir, {"op": "operator", "alice": "user", "bob": "user"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.setdefault("secret_keys", [FERNET_KEY])
    server = uvicorn.Server(uvicorn.Config(create_app(ServerConfig(data_dir=data_dir, **config)), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", data_dir, tokens)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    """Poll a job until its status is one of `statuses` (the API has no blocking wait; SSE is tested apart)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stayed {job['status']} ({job['reason']})"
        time.sleep(0.1)


def chat_spec(path: str | None = None, prompt: str = "Row {{ id }}: {{ text }}", **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "input": {"id_column": "id"},
        "task": {"model": "gpt-4o-mini", "prompt": prompt, "params": {"max_tokens": 20}},
        "chunk_size": 50,
    }
    if path:
        spec["input"]["path"] = path
    for k, v in extra.items():
        spec[k] = v
    return spec


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "inputs"
    d.mkdir()
    pq.write_table(make_rows(200), d / "rows.parquet")
    return d


@pytest.fixture
def server(tmp_path: Path, inputs: Path) -> Iterator[Live]:
    with live_server(tmp_path / "data", allow_dirs=[inputs], webhook_backoff_s=0.1, webhook_allow=["127.0.0.0/8"]) as live:
        yield live


def test_isolation_roles_and_credentials(server: Live) -> None:
    alice, bob, op, anon = server.client("alice"), server.client("bob"), server.client("op"), server.client(None)
    a = alice.post("/jobs", json={"spec": chat_spec("rows.parquet")})
    assert a.status_code == 201, a.text
    b = bob.post("/jobs", json={"spec": chat_spec("rows.parquet", prompt="Bob {{ id }}: {{ text }}")})
    assert b.status_code == 201, b.text
    ja, jb = a.json()["id"], b.json()["id"]
    assert ja != jb

    # 401 without a token or with a wrong one, on every kind of endpoint
    for path in ("/me", "/jobs", f"/jobs/{ja}", "/users", "/metrics", "/overview", "/lanes"):
        assert anon.get(path).status_code == 401, path
    bad = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer bf_nope"})
    assert bad.get("/jobs").status_code == 401
    assert anon.post(f"/jobs/{ja}/cancel").status_code == 401

    # another user's job is a 404, for reading and for acting
    for path in (f"/jobs/{ja}", f"/jobs/{ja}/progress", f"/jobs/{ja}/dead-letters", f"/jobs/{ja}/output", f"/jobs/{ja}/events"):
        assert bob.get(path).status_code == 404, path
    for action in ("pause", "resume", "cancel"):
        assert bob.post(f"/jobs/{ja}/{action}").status_code == 404
    assert [j["id"] for j in alice.get("/jobs").json()] == [ja]
    assert [j["id"] for j in bob.get("/jobs").json()] == [jb]

    # 403 for a user on operator endpoints
    assert alice.get("/users").status_code == 403
    assert alice.post("/users", json={"name": "eve"}).status_code == 403
    assert alice.patch("/users/bob", json={"weight": 5}).status_code == 403
    assert alice.post("/credentials", json={"name": "k", "provider": "openai", "api_key": "x"}).status_code == 403
    assert alice.get("/overview").status_code == 403
    assert alice.get("/metrics").status_code == 403
    assert alice.put("/lanes/abc/limits", json={"rpm": 10}).status_code == 403

    # the operator sees and acts on everyone's jobs
    assert {j["id"] for j in op.get("/jobs").json()} == {ja, jb}
    assert op.get(f"/jobs/{jb}").json()["owner"] == "bob"
    assert {j["id"] for j in op.get("/jobs", params={"owner": "alice"}).json()} == {ja}
    wait_for(op, ja, ("succeeded",))
    wait_for(op, jb, ("succeeded",))

    # a provider key goes in and never comes out
    r = op.post("/credentials", json={"name": "team", "provider": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": SECRET_KEY})
    assert r.status_code == 201 and SECRET_KEY not in r.text
    assert alice.get("/credentials").json() == []  # not granted to her yet
    assert op.put("/credentials/team/users/alice").status_code == 200
    assert alice.get("/credentials").json() == [{"name": "team", "provider": "openai", "base_url": None, "cache": "per user", "users": None}]
    assert op.get("/credentials").json() == [{"name": "team", "provider": "openai", "base_url": "http://127.0.0.1:9/v1", "cache": "per user", "users": ["alice"]}]
    for path in ("/me", "/jobs", "/overview", "/users", "/lanes", "/metrics", "/openapi.json"):
        assert SECRET_KEY not in op.get(path).text, path

    # users cannot point a job at the server's environment or at their own endpoint
    env_trick = chat_spec("rows.parquet")
    env_trick["task"].update(provider="openai", api_key_env="HOME")
    assert alice.post("/jobs", json={"spec": env_trick}).status_code == 400
    other_url = chat_spec("rows.parquet")
    other_url["task"]["base_url"] = "http://127.0.0.1:9/v1"
    assert alice.post("/jobs", json={"spec": other_url}).status_code == 400
    assert alice.post("/jobs", json={"spec": chat_spec("rows.parquet"), "credential": "nope"}).status_code == 400
    # an operator may use any credential without a grant: at submit and when the job starts alike
    assert op.post("/credentials", json={"name": "builtin", "provider": "sim"}).status_code == 201
    on_builtin = op.post("/jobs", json={"spec": chat_spec("rows.parquet", prompt="Op {{ id }}"), "credential": "builtin"})
    assert on_builtin.status_code == 201, on_builtin.text
    assert wait_for(op, on_builtin.json()["id"], ("succeeded", "failed"))["status"] == "succeeded"

    # operators create users over the API too; the token works at once and is stored hashed only
    created = op.post("/users", json={"name": "carol", "role": "user"})
    assert created.status_code == 201
    token = created.json()["token"]
    assert httpx.get(f"{server.url}/me", headers={"Authorization": f"Bearer {token}"}).json()["name"] == "carol"
    assert token.encode() not in (server.data_dir / "server.db").read_bytes()


def test_input_paths_stay_inside_the_allowed_directories(server: Live, inputs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(make_rows(10), outside / "secret.parquet")
    (inputs / "link.parquet").symlink_to(outside / "secret.parquet")
    (inputs / "linkdir").symlink_to(outside, target_is_directory=True)
    alice = server.client("alice")
    refused = [
        "../outside/secret.parquet",
        str(outside / "secret.parquet"),
        f"{inputs}/../outside/secret.parquet",
        "link.parquet",
        "linkdir/secret.parquet",
        str(inputs / "linkdir" / "secret.parquet"),
        "/etc/passwd",
        "../../../../../../etc/passwd",
    ]
    for path in refused:
        r = alice.post("/jobs", json={"spec": chat_spec(path)})
        assert r.status_code == 400, (path, r.text)
        assert "outside" in r.json()["detail"], r.text
    assert not list((server.data_dir / "outputs").glob("*/result.*"))
    for path in ("rows.parquet", str(inputs / "rows.parquet"), "./sub/../rows.parquet"):
        (inputs / "sub").mkdir(exist_ok=True)
        r = alice.post("/jobs", json={"spec": chat_spec(path, prompt=f"{path} {{{{ id }}}} {{{{ text }}}}")})
        assert r.status_code == 201, (path, r.text)


def test_upload_progress_sse_dead_letters_and_download(server: Live, tmp_path: Path) -> None:
    n = 300
    table = make_rows(n).append_column("n", pa.array([(i + 1) % 7 for i in range(n)]))
    csv_path = tmp_path / "up.csv"
    pcsv.write_csv(table, csv_path)

    def body() -> Iterator[bytes]:
        with open(csv_path, "rb") as f:
            while block := f.read(1000):  # many small chunks: the server writes them as they come
                yield block

    alice = server.client("alice")
    up = alice.post("/uploads", params={"filename": "up.csv"}, content=body(), headers={"Content-Type": "application/octet-stream"})
    assert up.status_code == 201, up.text
    assert up.json()["size"] == csv_path.stat().st_size
    # rows with n == 0 fail in the template (division by zero): dead letters with their reason
    spec = chat_spec(prompt="Row {{ id }}: {{ text }} {{ 100 // n }}", output={"columns": ["text"]})
    r = alice.post("/jobs", json={"spec": spec, "upload_id": up.json()["upload_id"]})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert server.client("bob").post("/jobs", json={"spec": spec, "upload_id": up.json()["upload_id"]}).status_code == 404

    events: list[tuple[str, dict[str, Any]]] = []
    with alice.stream("GET", f"/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind or "", json.loads(line[6:])))
                if kind == "end":
                    break
    assert events[-1] == ("end", {"status": "succeeded"})
    progress = [e for k, e in events if k == "progress"]
    assert progress[-1]["rows_ok"] + progress[-1]["rows_failed"] == n
    assert all(p["rows_committed"] <= p["rows_ok"] + p["rows_failed"] for p in progress)  # answered first, committed after
    assert alice.get(f"/jobs/{job_id}").json()["rows_committed"] == n

    expected_dead = sorted(f"id-{i:06d}" for i in range(n) if i % 7 == 6)
    dead = alice.get(f"/jobs/{job_id}/dead-letters").json()
    assert sorted(d["row_id"] for d in dead) == expected_dead
    assert all("ZeroDivisionError" in d["reason"] for d in dead)

    out = alice.get(f"/jobs/{job_id}/output")
    assert out.status_code == 200
    result = tmp_path / "result.parquet"
    result.write_bytes(out.content)
    got = pq.read_table(result)
    assert sorted(got.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    assert got.column("status").to_pylist().count("failed") == len(expected_dead)
    full = alice.get(f"/jobs/{job_id}/progress").json()
    assert full["cost_usd"] > 0 and full["series"]


def test_pause_resume_cancel_and_quotas(server: Live, inputs: Path) -> None:
    pq.write_table(make_rows(2000), inputs / "big.parquet")
    alice, op = server.client("alice"), server.client("op")
    slow = chat_spec("big.parquet", limits={"rpm": 1200})  # about two minutes alone: it is stopped long before
    assert op.patch("/users/alice", json={"max_jobs": 1}).json()["max_jobs"] == 1
    first = alice.post("/jobs", json={"spec": slow}).json()["id"]
    second = alice.post("/jobs", json={"spec": chat_spec("big.parquet", prompt="2 {{ id }} {{ text }}", limits={"rpm": 1200})}).json()["id"]
    wait_for(alice, first, ("running",))
    waiting = wait_for(alice, second, ("queued",))
    deadline = time.monotonic() + 10
    while "waiting for quota" not in (waiting["reason"] or ""):
        assert time.monotonic() < deadline, waiting
        waiting = alice.get(f"/jobs/{second}").json()
    assert "1 job(s) at once" in waiting["reason"]

    # pause keeps the answers; the waiting job starts; resume queues the first again
    while alice.get(f"/jobs/{first}").json()["rows_ok"] < 50:
        time.sleep(0.05)
    assert alice.post(f"/jobs/{first}/pause").json()["status"] == "pausing"
    paused = wait_for(alice, first, ("paused",))
    assert paused["reason"] == "paused by alice"
    wait_for(alice, second, ("running",))
    assert alice.post(f"/jobs/{first}/resume").json()["status"] == "queued"
    assert alice.post(f"/jobs/{first}/resume").status_code == 409

    # an operator cancels the running job; the queued one then runs
    assert op.post(f"/jobs/{second}/cancel").json()["status"] == "cancelling"
    cancelled = wait_for(alice, second, ("cancelled",))
    assert cancelled["reason"] == "cancelled by op"
    resumed = wait_for(alice, first, ("running",))
    assert resumed["rows_ok"] >= paused["rows_ok"]

    # a daily spend quota stops the running job and holds it, saying why
    spent = alice.get("/me").json()["spent_today_usd"]
    assert spent > 0
    op.patch("/users/alice", json={"max_jobs": None, "usd_per_day": spent / 2})
    held = wait_for(alice, first, ("queued",))
    deadline = time.monotonic() + 10
    while "daily" not in (held["reason"] or ""):
        assert time.monotonic() < deadline, held
        held = alice.get(f"/jobs/{first}").json()
    assert "resumes at 00:00 UTC" in held["reason"]
    op.patch("/users/alice", json={"usd_per_day": None})
    wait_for(alice, first, ("running",))
    assert alice.post(f"/jobs/{first}/cancel").status_code == 200
    wait_for(alice, first, ("cancelled",))
    assert alice.post(f"/jobs/{first}/cancel").status_code == 409

    metrics = op.get("/metrics").text
    assert f'job="{first}"' not in metrics  # a job's own series go when its run ends; the user's totals stay
    assert any(line.startswith("backfill_user_requests_total{") and 'user="alice"' in line for line in metrics.splitlines())
    assert "backfill_request_latency_seconds_bucket" in metrics and "backfill_queue_depth" in metrics
    assert any(line.startswith("backfill_user_cost_usd_total{") and 'user="alice"' in line for line in metrics.splitlines())


async def test_webhooks_signed_and_retried(server: Live) -> None:
    got: dict[str, list[tuple[dict[str, str], bytes]]] = {"ok": [], "flaky": []}
    arrived = {"ok": asyncio.Event(), "flaky": asyncio.Event()}

    async def ok(request: web.Request) -> web.Response:
        got["ok"].append((dict(request.headers), await request.read()))
        arrived["ok"].set()
        return web.Response(text="thanks")

    async def flaky(request: web.Request) -> web.Response:
        got["flaky"].append((dict(request.headers), await request.read()))
        if len(got["flaky"]) <= 2:
            return web.Response(status=500)
        arrived["flaky"].set()
        return web.Response(text="thanks")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/flaky", flaky)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with server.aclient("alice") as alice:
            me = (await alice.put("/me/webhook", json={"url": f"http://127.0.0.1:{port}/ok"})).json()
            secret = me["webhook_secret"]
            one = (await alice.post("/jobs", json={"spec": chat_spec("rows.parquet")})).json()["id"]
            two = (await alice.post("/jobs", json={"spec": chat_spec("rows.parquet", prompt="2 {{ id }} {{ text }}"), "webhook_url": f"http://127.0.0.1:{port}/flaky"})).json()["id"]
            await asyncio.wait_for(asyncio.gather(arrived["ok"].wait(), arrived["flaky"].wait()), 60)
    finally:
        await runner.cleanup()

    headers, body = got["ok"][0]
    assert verify(secret, headers[SIGNATURE_HEADER], body)
    assert not verify(secret, headers[SIGNATURE_HEADER], body + b" ")
    assert not verify("another-secret", headers[SIGNATURE_HEADER], body)
    payload = json.loads(body)
    assert payload["event"] == "job.succeeded" and payload["job_id"] == one and payload["rows_ok"] == 200
    assert headers["X-Backfill-Event"] == "job.succeeded"

    assert len(got["flaky"]) == 3  # failed twice, delivered on the third attempt
    bodies = {b for _, b in got["flaky"]}
    assert len(bodies) == 1
    headers, body = got["flaky"][-1]
    assert verify(secret, headers[SIGNATURE_HEADER], body)
    assert json.loads(body)["job_id"] == two


def test_logs_are_json_with_ids_and_no_secrets(tmp_path: Path, inputs: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from backfill.server import logs

    logs.configure("info")
    with live_server(tmp_path / "data", allow_dirs=[inputs]) as live:
        op, alice = live.client("op"), live.client("alice")
        op.post("/credentials", json={"name": "team", "provider": "sim", "api_key": SECRET_KEY})
        op.put("/credentials/team/users/alice")
        job = alice.post("/jobs", json={"spec": chat_spec("rows.parquet"), "credential": "team"}).json()["id"]
        wait_for(alice, job, ("succeeded",))
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry.get("job_id") == job and entry.get("user") == "alice" and entry["msg"] == "job started" for entry in lines)
    assert SECRET_KEY not in err
    assert live.tokens["alice"] not in err
    ledger = (live.data_dir / "backfill.db").read_bytes()
    assert SECRET_KEY.encode() not in ledger


def test_openapi_has_no_500s(server: Live) -> None:
    """Property-based: schemathesis generates requests for every operation, with an operator's token."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {server.tokens['op']}"}
    strategy = schema.as_strategy()
    seen: list[tuple[str, str, int]] = []

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def call(case: Any) -> None:
        if case.path.endswith("/events"):
            case.query = {}
        response = case.call(headers=headers, timeout=10)
        seen.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"

    call()
    assert len({(m, p) for m, p, _ in seen}) >= 10, "schemathesis reached too few operations"
