"""The rate-limited chat workloads (1, 2 and 3): every tool over the same input, each against a fresh
simulator with the same limits and latency, one after the other; one table of ratios."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from backfill.tokens import count_messages

from common import (
    SIM_BURST_S,
    ClientConfig,
    ClientResult,
    SimCounts,
    emit,
    fmt,
    make_input,
    rows_cell,
    run_client,
    sim,
    sim_counts,
    table,
)


@dataclass
class ChatWorkload:
    name: str
    title: str
    rows: int
    words: int  # prompt length in tokens, about
    max_tokens: int
    rpm: float
    tpm: float
    give_limits: bool = True  # False: the tools are told no limits and must learn or guess them
    latency: float = 0.8


def theoretical_min_s(w: ChatWorkload, input_path: Path) -> float:
    """The sim's buckets start full and refill at limit/60 per second: the binding limit decides."""
    texts = pq.read_table(input_path, columns=["text"]).column("text").to_pylist()
    tokens = sum(count_messages([{"role": "user", "content": t}], "gpt-4o-mini") for t in texts) + w.max_tokens * len(texts)
    by_requests = (w.rows - w.rpm * SIM_BURST_S / 60) / (w.rpm / 60)
    by_tokens = (tokens - w.tpm * SIM_BURST_S / 60) / (w.tpm / 60)
    return max(by_requests, by_tokens, 60 / w.rpm)  # a tiny --scale fits in the burst


def run(w: ChatWorkload, tools: list[str], wd: Path) -> str:
    input_path = make_input(wd / "input.parquet", w.rows, w.words)
    minimum = theoretical_min_s(w, input_path)
    measured: list[tuple[ClientResult, SimCounts | None]] = []
    for tool in tools:
        with sim(wd, rpm=w.rpm, tpm=w.tpm, latency=w.latency, output_tokens=w.max_tokens, name=f"sim-{tool}") as s:
            cfg = ClientConfig(
                tool=tool,
                input=str(input_path),
                out=str(wd / f"{tool}.parquet"),
                check=str(wd / f"{tool}-check.parquet"),
                base_url=s.base_url,
                rpm=w.rpm if w.give_limits else None,
                tpm=w.tpm if w.give_limits else None,
                max_tokens=w.max_tokens,
                state_dir=str(wd / f"state-{tool}"),
            )
            # A tool that needs over twice the minimum is far off the mark; no need to wait it out.
            result = run_client(cfg, wd, w.rows, timeout_s=2 * minimum + 120)
        counts = sim_counts(s.log) if s.log is not None and result.ok else None
        measured.append((result, counts))
        print(f"  {w.name} {tool}: {result.wall_s:.1f} s, {result.why}", flush=True)
    header = ["tool", "wall s", "× minimum", "429s (% of requests)", "re-sent", "rows answered", "client CPU s", "peak RSS MB"]
    body = []
    for r, c in measured:
        if not r.ok or c is None:
            body.append([r.tool, "—", "—", "—", "—", "—", "—", r.why or "failed"])
            continue
        share = 100 * c.rate_limited / max(c.requests, 1)
        body.append(
            [
                r.tool,
                fmt(r.wall_s),
                f"{r.wall_s / minimum:.3f}",
                f"{c.rate_limited:,} ({share:.2f}%)",
                f"{c.resent:,}",
                rows_cell(r, w.rows),
                fmt(r.cpu_s),
                fmt(r.peak_rss_mb, 0),
            ]
        )
    limits = f"{w.rpm:,.0f} requests/min, {w.tpm:,.0f} tokens/min" + ("" if w.give_limits else " (not told to the tools)")
    notes = [
        f"{w.rows:,} rows, ~{w.words}-token prompts, max_tokens {w.max_tokens}; sim limits {limits}, burst {SIM_BURST_S:g} s, latency mean {w.latency} s (lognormal σ 0.5).",
        f"theoretical minimum {minimum:.1f} s (work ÷ binding limit, less the sim's initial burst); wall = reading the input to the output written.",
        "re-sent: answers (200) to a request the sim had already answered; client CPU excludes interpreter start and imports.",
    ]
    text = table(w.title, header, body, notes)
    emit(w.name, text, {"workload": w, "minimum_s": minimum, "results": measured})
    return text
