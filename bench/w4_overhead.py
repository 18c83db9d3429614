"""Workload 4, overhead: 50,000 chat requests against a zero-latency simulator with no limits — requests/s
and client CPU per 1,000 requests, backfill's cache and output writes included.
The competitors run the first --competitor-rows rows (CPU per request does not depend on the count, and at
their speed the full 50,000 would take most of the suite's time).
Run: bench/.venv/bin/python bench/w4_overhead.py [--scale 0.2] [--competitor-rows 10000]
"""

from __future__ import annotations

import pyarrow.parquet as pq

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
    tools,
    workdir,
)

CURATOR_UNBOUNDED_RPM = 100_000_000


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--competitor-rows", type=int, default=10_000)
    args = p.parse_args()
    rows = int(50_000 * args.scale)
    with workdir(args.workdir, "w4") as wd:
        full = make_input(wd / "input.parquet", rows, 200)
        few_rows = min(rows, args.competitor_rows)
        few = wd / "input-few.parquet"
        pq.write_table(pq.read_table(full).slice(0, few_rows), few)
        measured: list[tuple[ClientResult, int]] = []
        for tool in tools(args.tools):
            n = rows if tool == "backfill" else few_rows
            with sim(wd, latency=0.0, output_tokens=50, log=False) as s:
                cfg = ClientConfig(
                    tool=tool,
                    input=str(full if tool == "backfill" else few),
                    out=str(wd / f"{tool}.parquet"),
                    check=str(wd / f"{tool}-check.parquet"),
                    base_url=s.base_url,
                    state_dir=str(wd / f"state-{tool}"),
                    # Told no limits, Curator applies its own default of 200 requests/min; tell it limits far above reach.
                    rpm=CURATOR_UNBOUNDED_RPM if tool == "curator" else None,
                    tpm=CURATOR_UNBOUNDED_RPM * 1000 if tool == "curator" else None,
                )
                r = run_client(cfg, wd, n, timeout_s=600 + n * 0.05)
            measured.append((r, n))
            print(f"  w4 {tool}: {r.wall_s:.1f} s {r.why}", flush=True)
    base = next((r.cpu_s / n for r, n in measured if r.tool == "backfill" and r.ok), None)
    header = ["tool", "requests", "wall s", "requests/s", "client CPU s / 1,000 requests", "× backfill CPU", "rows answered", "peak RSS MB"]
    body = []
    for r, n in measured:
        if not r.ok:
            body.append([r.tool, f"{n:,}", "—", "—", "—", "—", "—", r.why])
            continue
        per = r.cpu_s / n
        body.append(
            [r.tool, f"{n:,}", fmt(r.wall_s), fmt(n / r.wall_s, 0), f"{per * 1000:.3f}", f"{per / base:.1f}" if base else "—", rows_cell(r, n), fmt(r.peak_rss_mb, 0)]
        )
    notes = [
        "zero latency, no limits; ~200-token prompts, max_tokens 50; up to 256 requests in flight; the sim runs in its own process (the other core).",
        "Curator is told 100,000,000 requests/min (and 1000× that in tokens): told nothing, it applies its default of 200 requests/min.",
        "requests/s on one core: the client is one Python process (one core); the sim has the other.",
    ]
    text = table("Workload 4 — overhead (zero latency, no limits)", header, body, notes)
    emit("w4_overhead", text, {"results": measured})


if __name__ == "__main__":
    main()
