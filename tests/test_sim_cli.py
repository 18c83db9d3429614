"""Running the sim: `python -m backfill.sim` in a subprocess, the background-thread mode, the JSONL log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
import typer
from typer.testing import CliRunner

from backfill.sim import KeyLimits, SimConfig, Simulator, read_jsonl
from backfill.sim.cli import sim_command

KEY = "sk-cli-secret-123"


def post(url: str, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_module_entry_point_serves_and_logs(tmp_path) -> None:
    log_path = tmp_path / "sim.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backfill.sim",
            "--port",
            "0",
            "--key",
            KEY,
            "--rpm",
            "600",
            "--tpm",
            "100000",
            "--log",
            str(log_path),
            "--models",
            "sim-chat,tiny:100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read() if not line else line
        base_url = next(w for w in line.split() if w.startswith("http://")).rstrip(";)")
        body = {
            "model": "sim-chat",
            "messages": [{"role": "user", "content": "hello from the cli test"}],
            "max_tokens": 50,
        }
        status, answer = post(base_url + "/v1/chat/completions", body, KEY)
        assert status == 200 and answer["choices"][0]["message"]["content"].startswith(
            "Answer to «hello from the cli test»"
        )
        assert post(base_url + "/v1/chat/completions", body, "sk-wrong")[0] == 401
        assert post(base_url + "/v1/chat/completions", {**body, "model": "gpt-4o"}, KEY)[0] == 404
        assert post(base_url + "/v1/chat/completions", {**body, "model": "tiny", "max_tokens": 200}, KEY)[0] == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    entries = read_jsonl(log_path)
    assert [e.status for e in entries] == [200, 401, 404, 400]
    assert entries[0].key.startswith("key-") and entries[0].output_tokens > 0
    assert KEY not in log_path.read_text()


def test_cli_rejects_bad_options_in_a_sentence() -> None:
    app = typer.Typer()
    app.command("sim")(sim_command)
    app.command("other")(lambda: None)  # two commands, so `sim` is addressed by name as `backfill sim` is
    result = CliRunner().invoke(app, ["sim", "--outage", "40:30:429"])
    assert result.exit_code == 2 and "END after START" in result.output
    result = CliRunner().invoke(app, ["sim", "--error-rate-500", "0.8", "--reset-rate", "0.5"])
    assert result.exit_code == 2 and "add up to more than 1" in result.output


def test_thread_mode_for_synchronous_callers() -> None:
    config = SimConfig(keys={KEY: KeyLimits(rpm=6000)})
    with Simulator(config) as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0)
        response = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "sync hello"}]
        )
        assert response.choices[0].message.content.startswith("Answer to «sync hello»")
        client.close()
        url = sim.base_url
    assert len(sim.log) == 1
    with pytest.raises(urllib.error.URLError):
        post(url + "/chat/completions", {}, KEY)  # stopped: nothing listens any more


def test_log_windows_and_duplicates() -> None:
    config = SimConfig(keys={KEY: KeyLimits(rpm=600)})  # holds 10, refills 10/s
    with Simulator(config) as sim:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same"}]}
        statuses = [post(sim.base_url + "/chat/completions", body, KEY)[0] for _ in range(14)]
    assert statuses.count(200) >= 10 and statuses.count(429) >= 1
    windows = sim.log.admitted_per_window(10.0)
    assert len(windows) == 1 and windows[0].requests == statuses.count(200)
    assert sim.log.duplicates() == {sim.log.entries[0].request_hash: statuses.count(200)}
    assert sim.log.count_by_status()[429] == statuses.count(429)
