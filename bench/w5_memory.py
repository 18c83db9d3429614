"""Workload 5, memory: backfill's peak RSS over 100,000 and 1,000,000 short input rows (zero latency, no
limits); the ratio must stay near 1 because the input is streamed in chunks and results go to disk.
Run: bench/.venv/bin/python bench/w5_memory.py [--scale 0.1]
"""

from __future__ import annotations

from common import (
    ClientConfig,
    ClientResult,
    emit,
    fmt,
    make_input,
    parser,
    rows_cell,
    run_client,
    sim,
    table,
    workdir,
)


def main() -> None:
    args = parser(__doc__).parse_args()
    sizes = [int(100_000 * args.scale), int(1_000_000 * args.scale)]
    measured: list[tuple[int, ClientResult]] = []
    with workdir(args.workdir, "w5") as wd:
        for n in sizes:
            path = make_input(wd / f"input-{n}.parquet", n, 8)
            with sim(wd, latency=0.0, output_tokens=8, log=False) as s:
                cfg = ClientConfig(
                    tool="backfill",
                    input=str(path),
                    out=str(wd / f"out-{n}.parquet"),
                    check=str(wd / f"check-{n}.parquet"),
                    base_url=s.base_url,
                    max_tokens=8,
                    state_dir=str(wd / f"state-{n}"),
                )
                r = run_client(cfg, wd, n, timeout_s=600 + n * 0.01)
            measured.append((n, r))
            print(f"  w5 {n}: {r.wall_s:.1f} s {r.peak_rss_mb:.0f} MB {r.why}", flush=True)
    small = measured[0][1].peak_rss_mb or 1.0
    header = ["input rows", "peak RSS MB", "× the smaller input", "wall s", "requests/s", "rows answered"]
    body = [
        [f"{n:,}", fmt(r.peak_rss_mb, 0), f"{r.peak_rss_mb / small:.2f}", fmt(r.wall_s), fmt(n / r.wall_s, 0), rows_cell(r, n)]
        if r.ok
        else [f"{n:,}", "—", "—", "—", "—", r.why]
        for n, r in measured
    ]
    notes = [
        "backfill only: the competitors hold every row, task and answer in memory by design (a list gathered at once), so they grow linearly; at their speed 1,000,000 rows would take over an hour each.",
        "~8-token prompts, max_tokens 8, zero latency, no limits, chunk 500 rows; peak RSS of the client process, imports included.",
    ]
    text = table("Workload 5 — memory", header, body, notes)
    emit("w5_memory", text, {"results": measured})


if __name__ == "__main__":
    main()
