"""Workload 5, memory: backfill's peak RSS over 100,000 and 1,000,000 short input rows (zero latency, no
limits), reported as MB per 100,000 rows — the slope between the two sizes, which stays near 0 because
the input is streamed in chunks and results go to disk — and the intercept (what does not grow).
Run: bench/.venv/bin/python bench/w5_memory.py [--scale 0.1]
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Growth:
    mb_per_100k: float  # the slope: what 100,000 more rows cost in peak RSS
    intercept_mb: float  # the peak at 0 rows on that line: what does not grow with the input


def slope(measured: list[tuple[int, ClientResult]]) -> Growth | None:
    """The line through the two sizes' peaks. A ratio of the two peaks would mostly measure what
    every run holds whatever its size (over 200 MB of each peak), not what grows with the rows."""
    (n0, r0), (n1, r1) = measured
    if not (r0.ok and r1.ok) or n1 == n0:
        return None
    per_100k = (r1.peak_rss_mb - r0.peak_rss_mb) / ((n1 - n0) / 100_000)
    return Growth(per_100k, r0.peak_rss_mb - per_100k * n0 / 100_000)


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
    header = ["input rows", "peak RSS MB", "wall s", "requests/s", "rows answered"]
    body = [
        [f"{n:,}", fmt(r.peak_rss_mb, 0), fmt(r.wall_s), fmt(n / r.wall_s, 0), rows_cell(r, n)]
        if r.ok
        else [f"{n:,}", "—", "—", "—", r.why]
        for n, r in measured
    ]
    growth = slope(measured)
    summary = (
        f"**{growth.mb_per_100k:+.1f} MB per 100,000 rows** (the slope between the two sizes); "
        f"{growth.intercept_mb:.0f} MB that does not grow with the input (interpreter, imports, loop, buffers)."
        if growth is not None
        else "no slope: a run did not finish."
    )
    notes = [
        summary,
        "backfill only: the competitors hold every row, task and answer in memory by design (a list gathered at once), so they grow linearly; at their speed 1,000,000 rows would take over an hour each.",
        "~8-token prompts, max_tokens 8, zero latency, no limits, chunk 500 rows; peak RSS of the client process, imports included.",
    ]
    text = table("Workload 5 — memory", header, body, notes)
    emit("w5_memory", text, {"results": measured, "growth": growth})


if __name__ == "__main__":
    main()
