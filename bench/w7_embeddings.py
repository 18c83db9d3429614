"""Workload 7, embeddings: 200,000 short rows through the embeddings endpoint at 3,000 requests/min and
10,000,000 tokens/min, latency 0.3 s: requests made and rows/s. backfill packs rows into requests by itself;
the competitors are given batches of 2,048 inputs (the API's maximum), as a careful user would write.
Run: bench/.venv/bin/python bench/w7_embeddings.py [--scale 0.25]
"""

from __future__ import annotations

from common import (
    ClientConfig,
    ClientResult,
    SimCounts,
    emit,
    fmt,
    make_input,
    parser,
    rows_cell,
    run_client,
    sim,
    sim_counts,
    table,
    tools,
    workdir,
)

RPM, TPM, LATENCY = 3_000, 10_000_000, 0.3


def main() -> None:
    args = parser(__doc__).parse_args()
    rows = int(200_000 * args.scale)
    measured: list[tuple[ClientResult, SimCounts | None]] = []
    with workdir(args.workdir, "w7") as wd:
        path = make_input(wd / "input.parquet", rows, 16)
        for tool in tools(args.tools):
            with sim(wd, rpm=RPM, tpm=TPM, latency=LATENCY, name=f"sim-{tool}") as s:
                cfg = ClientConfig(
                    tool=tool,
                    kind="embedding",
                    model="text-embedding-3-small",
                    input=str(path),
                    out=str(wd / f"{tool}.parquet"),
                    check=str(wd / f"{tool}-check.parquet"),
                    base_url=s.base_url,
                    rpm=RPM,
                    tpm=TPM,
                    state_dir=str(wd / f"state-{tool}"),
                )
                r = run_client(cfg, wd, rows, timeout_s=1800)
            measured.append((r, sim_counts(s.log) if r.ok and s.log is not None else None))
            print(f"  w7 {tool}: {r.wall_s:.1f} s {r.why}", flush=True)
    header = ["tool", "requests made", "429s", "wall s", "rows/s", "client CPU s", "rows answered", "peak RSS MB"]
    body = []
    for r, c in measured:
        if not r.ok or c is None:
            body.append([r.tool, "—", "—", "—", "—", "—", "—", r.why])
            continue
        body.append([r.tool, f"{c.requests:,}", f"{c.rate_limited:,}", fmt(r.wall_s), fmt(rows / r.wall_s, 0), fmt(r.cpu_s), rows_cell(r, rows), fmt(r.peak_rss_mb, 0)])
    notes = [f"{rows:,} rows of ~16 tokens, text-embedding-3-small (64 dimensions in the sim), {RPM:,} requests/min, {TPM:,} tokens/min, latency {LATENCY} s."]
    text = table("Workload 7 — embeddings", header, body, notes)
    emit("w7_embeddings", text, {"results": measured})


if __name__ == "__main__":
    main()
