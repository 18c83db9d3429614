"""The server's stderr is JSON lines only (uvicorn's and the access log too, tracebacks as a field), with no
token from a query string; a key a provider echoes in part is scrubbed; /docs is served from the package;
responses carry a Content-Security-Policy and X-Frame-Options."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
from aiohttp import web

import backfill
from backfill.errors import BackfillError
from backfill.server import auth
from backfill.server.app import ServerConfig, create_app
from backfill.server.db import ServerDB
from conftest import make_rows

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_every_stderr_line_is_json_and_no_query_token_is_logged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    db = ServerDB(data / "server.db")
    _, token = auth.add_user(db, "op", "operator")
    db.close()
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backfill.server", "serve", "--data-dir", str(data), "--port", str(port),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "BACKFILL_SECRET_KEY": "Xn3bq7Vt8dQ0w2m5k1Lr9sYhZc4uJpAeTgFiOoBvNlM="},
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while not any("Uvicorn running" in line or "Application startup complete" in line for line in lines):
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        assert line, f"the server exited: {lines}"
        lines.append(line)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        assert (await client.get(f"/me?token={token}&access_token={token}")).status_code == 401
        assert (await client.get("/me", headers={"Authorization": f"Bearer {token}"})).status_code == 200
    with socket.create_connection(("127.0.0.1", port)) as s:  # uvicorn's own warning about a malformed request
        s.sendall(b"NOT HTTP\r\n\r\n")
        s.recv(100)
    proc.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(proc.stderr.read(), 60)
    await proc.wait()
    lines += rest.decode().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]  # each line is one JSON object
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert [(r["method"], r["path"].split("?")[0], r["status"]) for r in access] == [("GET", "/me", 401), ("GET", "/me", 200)]
    assert access[0]["path"] == "/me?token=***&access_token=***"
    assert any(r["logger"].startswith("uvicorn") and r["level"] == "warning" for r in records)
    assert token not in "\n".join(lines) and token[3:20] not in "\n".join(lines)


def test_a_traceback_is_a_field_of_its_json_line(tmp_path: Path) -> None:
    import subprocess

    code = "from backfill.server import logs; logs.configure(); raise RuntimeError('boom bf_' + 'x' * 40)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    [line] = proc.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "critical" and "Traceback" in record["error"] and "RuntimeError" in record["error"]
    assert "x" * 40 not in line


async def test_a_key_a_provider_echoes_in_part_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    echoes = f"Key {KEY[:8]}...{KEY[-4:]} (masked sk-proj-****{KEY[-4:]}, or in part: {KEY[10:22]}) has no access."

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": echoes, "type": "invalid_request_error", "code": "forbidden"}}, status=403)

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", refuse)])
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("HARDENING_TEST_KEY", KEY)
    try:
        with pytest.raises(BackfillError) as e:
            await backfill.arun(
                make_rows(3).to_pandas(), prompt="{{ text }}", model="gpt-4o-mini", provider="openai",
                base_url=f"http://127.0.0.1:{port}/v1", api_key_env="HARDENING_TEST_KEY", id_column="id",
                state_dir=tmp_path, progress=False, return_type="arrow",
            )
    finally:
        await runner.cleanup()
    message = str(e.value)
    assert "403" in message and "has no access" in message
    for part in ("sk-proj", KEY[-4:], KEY[10:22], "****" + KEY[-4:]):
        assert part not in message, message


async def test_docs_come_from_the_package_and_pages_carry_a_security_policy(tmp_path: Path) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backfill") as client:
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text.lower() and "https://" not in docs.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert len(assets) == 3  # the script, the style sheet and the icon
        for asset in assets:
            got = await client.get(asset)
            assert got.status_code == 200 and len(got.content) > 500, asset
        assert "script-src 'self' 'sha256-" in docs.headers["content-security-policy"]
        dashboard = await client.get("/")
        assert dashboard.status_code == 200
        policy = dashboard.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
        assert dashboard.headers["x-frame-options"] == "DENY"
        assert (await client.get("/static/app.js")).headers["x-frame-options"] == "DENY"
