"""Workload 6, resume: backfill over workload 1's setting, killed with SIGKILL when the sim has answered half
the rows, then run again with the same arguments; counts the requests answered twice (re-sent) against the
in-flight cap, and the wall time added over an uninterrupted run measured in the same run.
Run: bench/.venv/bin/python bench/w6_resume.py [--scale 0.5]
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from common import (
    MAX_IN_FLIGHT,
    ClientConfig,
    emit,
    finish_client,
    fmt,
    fresh,
    make_input,
    parser,
    rows_cell,
    run_client,
    sim,
    sim_counts,
    start_client,
    table,
    workdir,
)

RPM, LATENCY = 12_000, 0.8


def _answered(log: Path) -> int:
    with open(log, encoding="utf-8") as f:
        return sum(1 for line in f if '"status":200' in line)


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = int(10_000 * args.scale)
    with workdir(args.workdir, "w6") as wd:
        path = make_input(wd / "input.parquet", rows, 200)

        def config(base_url: str, name: str) -> ClientConfig:
            return ClientConfig(
                tool="backfill",
                input=str(path),
                out=str(wd / f"{name}.parquet"),
                check=str(wd / f"{name}-check.parquet"),
                base_url=base_url,
                rpm=RPM,
                tpm=100_000_000,
                state_dir=str(wd / f"state-{name}"),
            )

        with sim(wd, rpm=RPM, tpm=100_000_000, latency=LATENCY, name="sim-whole") as s:
            t0 = time.perf_counter()
            whole = run_client(config(s.base_url, "whole"), wd, rows)
            whole_s = time.perf_counter() - t0
        with sim(wd, rpm=RPM, tpm=100_000_000, latency=LATENCY, name="sim-killed") as s:
            assert s.log is not None
            cfg = config(s.base_url, "killed")
            fresh(cfg)
            t0 = time.perf_counter()
            proc = start_client(cfg, wd)
            while _answered(s.log) < rows // 2 and proc.poll() is None:
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            first_s = time.perf_counter() - t0
            at_kill = _answered(s.log)
            t1 = time.perf_counter()
            resumed = finish_client(start_client(cfg, wd), cfg, rows, timeout_s=3600)
            second_s = time.perf_counter() - t1
            counts = sim_counts(s.log)
    added = first_s + second_s - whole_s
    header = ["run", "wall s", "answered before the kill", "re-sent after resume", "in-flight cap", "rows answered"]
    body = [
        ["uninterrupted", fmt(whole_s), "—", "—", str(MAX_IN_FLIGHT), rows_cell(whole, rows) if whole.ok else whole.why],
        [
            "killed at 50% + resumed",
            f"{fmt(first_s)} + {fmt(second_s)} = {fmt(first_s + second_s)} (+{fmt(added)} s, +{100 * added / whole_s:.1f}%)",
            f"{at_kill:,}",
            f"{counts.resent:,}",
            str(MAX_IN_FLIGHT),
            rows_cell(resumed, rows) if resumed.ok else resumed.why,
        ],
    ]
    notes = [
        f"{rows:,} rows, ~200-token prompts, max_tokens 50, {RPM:,} requests/min, latency {LATENCY} s; SIGKILL when the sim log shows half the rows answered; the same arguments again resume the job.",
        "wall s here is process start to exit (interpreter and imports included, in both runs).",
        "Competitors: the naive loop and LiteLLM keep nothing on disk, so a rerun re-sends every row already answered (half the job); not run.",
        "Curator not run here (time); its cache directory is its way to resume.",
    ]
    text = table("Workload 6 — resume after kill -9", header, body, notes)
    emit("w6_resume", text, {"whole": whole, "resumed": resumed, "first_s": first_s, "second_s": second_s, "whole_s": whole_s, "answered_at_kill": at_kill, "resent": counts.resent})


if __name__ == "__main__":
    main()
