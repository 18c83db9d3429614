"""Workload 4, overhead: 50,000 chat requests against a zero-latency simulator with no limits — requests/s
and client CPU per request, held against a bare aiohttp loop on the same simulator (a ratio that holds
across machines), backfill's cache and output writes included. Every tool sends the same requests.
Run: bench/.venv/bin/python bench/w4_overhead.py [--scale 0.2] [--tools backfill,naive]
"""

from __future__ import annotations

from common import (
    BARE,
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
    unbounded,
    workdir,
)


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = int(50_000 * args.scale)
    measured: list[ClientResult] = []
    with workdir(args.workdir, "w4") as wd:
        path = make_input(wd / "input.parquet", rows, 200)
        # The yardstick first, then the tools, each against a fresh sim process of its own.
        for tool in [BARE, *tools(args.tools)]:
            with sim(wd, latency=0.0, output_tokens=50, log=False) as s:
                cfg = ClientConfig(
                    tool=tool,
                    input=str(path),
                    out=str(wd / f"{tool}.parquet"),
                    check=str(wd / f"{tool}-check.parquet"),
                    base_url=s.base_url,
                    state_dir=str(wd / f"state-{tool}"),
                    **unbounded(tool),
                )
                r = run_client(cfg, wd, rows, timeout_s=600 + rows * 0.05)
            measured.append(r)
            print(f"  w4 {tool}: {r.wall_s:.1f} s {r.why}", flush=True)
    bare = next((r.cpu_s / rows for r in measured if r.tool == BARE and r.ok), None)
    header = [
        "tool", "requests", "wall s", "requests/s", "client CPU ms / request", "× bare aiohttp CPU", "rows answered", "peak RSS MB",
    ]
    body = []
    for r in measured:
        name = f"{BARE} (bare loop)" if r.tool == BARE else r.tool
        if not r.ok:
            body.append([name, f"{rows:,}", "—", "—", "—", "—", "—", r.why])
            continue
        per = r.cpu_s / rows
        body.append(
            [
                name, f"{rows:,}", fmt(r.wall_s), fmt(rows / r.wall_s, 0), f"{per * 1000:.3f}",
                f"{per / bare:.2f}" if bare else "—", rows_cell(r, rows), fmt(r.peak_rss_mb, 0),
            ]
        )
    notes = [
        "zero latency, no limits; ~200-token prompts, max_tokens 50; up to 256 requests in flight; the sim runs in its own process (the other core).",
        f"{BARE} (bare loop): 256 tasks over one aiohttp session, orjson both ways, no retries, reading the same input and writing the same output — the least a Python client does per request; × bare aiohttp CPU is the ratio that holds across machines.",
        "every tool sends the same requests, on uvloop; client CPU excludes interpreter start and imports.",
        "Curator is told 100,000,000 requests/min (and 1000× that in tokens): told nothing, it applies its default of 200 requests/min.",
    ]
    text = table("Workload 4 — overhead (zero latency, no limits)", header, body, notes)
    emit("w4_overhead", text, {"rows": rows, "bare_cpu_s_per_request": bare, "results": measured})


if __name__ == "__main__":
    main()
