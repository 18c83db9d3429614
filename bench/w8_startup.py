"""Workload 8, start-up: a 3,000-row file job started as a user starts it, measured from outside its
process — the time from exec to the first request arriving at a simulator in this process, the whole
job's wall time and CPU, and the child's peak RSS (its VmHWM, read from /proc while it runs).
backfill runs as its CLI and as a script (bench/clients.py, like every other tool), the others as that script.
Run: bench/.venv/bin/python bench/w8_startup.py [--scale 0.1] [--tools backfill,naive]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from backfill.sim import SimConfig, Simulator

from common import (
    ClientConfig,
    ClientResult,
    check_rows,
    emit,
    finish_client,
    fmt,
    fresh,
    make_input,
    parser,
    rows_cell,
    start_client,
    table,
    tools,
    unbounded,
    venv_env,
    workdir,
)

CLI = "backfill CLI"
# Often enough that a first request is seen within about a millisecond of its arrival, and that the
# child's peak RSS is read close to its end (VmHWM only grows, so a late read loses nothing before it).
POLL_S = 0.001


@dataclass
class Startup:
    """One child process, seen from outside."""

    name: str
    ok: bool = True
    why: str = ""
    first_request_s: float = 0.0  # exec to the first request arriving at the sim
    wall_s: float = 0.0  # exec to exit
    cpu_s: float = 0.0  # the child's user + system, start-up and imports included
    peak_rss_mb: float = 0.0
    requests: int = 0
    rows: str = ""


def _vm_hwm_kb(pid: int) -> int:
    """The child's own peak RSS. Not its rusage: Linux carries the parent's peak over exec, so
    ru_maxrss would report this process (the sim, pyarrow, backfill) as the child's floor."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except (FileNotFoundError, ProcessLookupError):  # gone between two reads
        return 0


def watch(proc: subprocess.Popen[str], started: float, sim: Simulator, timeout_s: float, out: Startup) -> None:
    """Poll until the child exits: the first request's arrival, the peak RSS; then reap it for its CPU."""
    seen = len(sim.log)
    hwm_kb = 0
    while True:
        if not out.first_request_s and len(sim.log) > seen:
            out.first_request_s = time.monotonic() - started
        hwm_kb = max(hwm_kb, _vm_hwm_kb(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            out.wall_s = time.monotonic() - started
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for its rusage
            break
        if time.monotonic() - started > timeout_s:
            proc.kill()
            proc.wait()
            out.ok, out.why = False, f"did not finish within {timeout_s:.0f} s"
            return
        time.sleep(POLL_S)
    out.cpu_s = usage.ru_utime + usage.ru_stime
    out.peak_rss_mb = hwm_kb / 1024
    out.requests = len(sim.log) - seen
    if not out.first_request_s and out.requests:
        out.first_request_s = out.wall_s  # sent and answered between two polls, just before exit


def run_cli(cfg: ClientConfig, wd: Path, sim: Simulator, rows: int, timeout_s: float) -> Startup:
    """`python -m backfill run ...`, as a user types it."""
    fresh(cfg)
    cmd = [
        sys.executable, "-m", "backfill", "run", "--input", cfg.input, "--id-column", "id", "--prompt", "{{ text }}",
        "--model", cfg.model, "--provider", "sim", "--base-url", cfg.base_url, "--max-tokens", str(cfg.max_tokens),
        "--output", cfg.out, "--state-dir", cfg.state_dir, "--quiet",
    ]
    out = Startup(CLI)
    with open(wd / "backfill-cli.log", "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=venv_env(cfg.tool, wd))
        watch(proc, started, sim, timeout_s, out)
    if out.ok and proc.returncode != 0:
        tail = (wd / "backfill-cli.log").read_text().strip().splitlines()[-1:]
        out.ok, out.why = False, f"exited {proc.returncode}: {' '.join(tail)[:200]}"
    if out.ok:
        written = pq.read_table(cfg.out, columns=["id", "status"])
        ok = pa.array([s == "ok" for s in written.column("status").to_pylist()])
        pq.write_table(pa.table({"id": written.column("id"), "ok": ok}), cfg.check)
        check = ClientResult(CLI)
        check_rows(check, Path(cfg.check), rows)
        out.rows = rows_cell(check, rows)
    return out


def run_script(cfg: ClientConfig, wd: Path, sim: Simulator, rows: int, timeout_s: float) -> Startup:
    """`python bench/clients.py CONFIG`: the tool's imports, reading the file, its requests, the output."""
    fresh(cfg)
    out = Startup(cfg.tool)
    started = time.monotonic()
    proc = start_client(cfg, wd)
    watch(proc, started, sim, timeout_s, out)
    if not out.ok:
        return out
    result = finish_client(proc, cfg, rows, timeout_s)
    if not result.ok:
        out.ok, out.why = False, result.why
    else:
        out.rows = rows_cell(result, rows)
    return out


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = max(1, int(3_000 * args.scale))
    measured: list[Startup] = []
    with workdir(args.workdir, "w8") as wd, Simulator(SimConfig(latency_s=0.0)) as sim:
        path = make_input(wd / "input.parquet", rows, 200)
        runs = [(CLI, "backfill")] + [(tool, tool) for tool in tools(args.tools)]
        for name, tool in runs:
            cfg = ClientConfig(
                tool=tool,
                input=str(path),
                out=str(wd / f"{name.replace(' ', '-')}.parquet"),
                check=str(wd / f"{name.replace(' ', '-')}-check.parquet"),
                base_url=sim.base_url,
                state_dir=str(wd / f"state-{name.replace(' ', '-')}"),
                **unbounded(tool),
            )
            run = run_cli if name == CLI else run_script
            r = run(cfg, wd, sim, rows, timeout_s=300)
            measured.append(r)
            print(f"  w8 {name}: first request {r.first_request_s:.3f} s, {r.peak_rss_mb:.0f} MB {r.why}", flush=True)
    header = ["how it runs", "exec → first request s", "wall s", "CPU s", "peak RSS MB", "requests", "rows answered"]
    body = [
        [r.name, f"{r.first_request_s:.3f}", fmt(r.wall_s, 2), fmt(r.cpu_s, 2), fmt(r.peak_rss_mb, 0), f"{r.requests:,}", r.rows]
        if r.ok
        else [r.name, "—", "—", "—", "—", "—", r.why]
        for r in measured
    ]
    notes = [
        f"{rows:,} rows in a parquet file, ~200-token prompts, max_tokens 50; the sim runs in this (the bench's) process, zero latency, no limits.",
        "Curator is told 100,000,000 requests/min (and 1000× that in tokens): told nothing, it applies its default of 200 requests/min.",
        "measured from outside: from just before exec to the first request seen in the sim's log (polled every millisecond), to the exit; CPU from the child's rusage; peak RSS is the child's VmHWM read from /proc while it runs.",
        f"{CLI}: `python -m backfill run --input … --output …`; the others (backfill too): `python bench/clients.py`, which imports pyarrow and the tool, reads the file, sends, writes the output.",
    ]
    text = table(f"Workload 8 — start-up and baseline memory ({rows:,}-row file job)", header, body, notes)
    emit("w8_startup", text, {"rows": rows, "results": measured})


if __name__ == "__main__":
    main()
