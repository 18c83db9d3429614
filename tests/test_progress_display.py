"""The progress display at fixed terminal widths, and the log lines where standard error is not a terminal."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time

import pytest
from rich.console import Console

from backfill.engine.stats import JobStats
from backfill.limits import Bound
from backfill.progress import LiveView, show_progress

JOB_ID = "a1b2c3d4e5f6"


def busy_stats() -> JobStats:
    """A job part-way: 1,337 of 10,000 rows answered, 1,000 committed, tokens/min binding with max_tokens unset."""
    stats = JobStats(
        JOB_ID, 10_000, rows_ok=1_234, rows_failed=3, rows_committed=1_000, in_flight=12, max_in_flight=64,
        cost_usd=0.0123, rpm_limit=3_000, tpm_limit=2_000_000, unset_max_tokens_reserve=4096, rate_limited=2, retries=5,
    )
    stats.started = time.monotonic() - 30
    stats.sample(Bound.TOKENS)
    stats._samples[-1] = (time.monotonic() - 9, 0, 0, stats.rows_done, 0)  # nine seconds ago
    stats.rows_ok += 100
    # 80 requests of 400 prompt tokens in 9 s, each reserving 4,096 output tokens: 360k tokens reserved in the last minute.
    stats.requests_sent, stats.input_tokens, stats.tokens_reserved = 80, 32_000, 80 * (400 + 4096)
    for _ in range(10):
        stats.sample(Bound.TOKENS)
    return stats


def render(stats: JobStats, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None, legacy_windows=False)
    console.print(LiveView(stats))
    return console.file.getvalue().rstrip("\n").split("\n")


@pytest.mark.parametrize("width", [80, 120, 200])
def test_the_headline_fits_any_width_with_the_whole_job_id(width: int) -> None:
    lines = render(busy_stats(), width)
    assert all(len(line) <= width for line in lines), lines
    head = lines[0]
    assert head.startswith(JOB_ID + " ")  # whole, to type into `backfill status`
    assert "━" in head and "1,337/10,000" in head
    assert "11 rows/s" in head and "$0.0123" in head and re.search(r"ETA \d", head)
    # The details follow on the next line: committed and answered-not-committed apart, pace against the limits.
    assert "committed 1,000" in lines[1] and "answered 337" in lines[1] and "in flight 12" in lines[1]
    body = "\n".join(lines[1:])
    # Counted over the trailing minute as the provider counts them, not the 9 s burst scaled up (533/min).
    assert "80/3,000 req/min" in body and "360k/2.0M tok/min reserved" in body and "32k used" in body


def test_the_bar_and_details_grow_with_the_width() -> None:
    narrow, wide = render(busy_stats(), 80), render(busy_stats(), 200)
    assert wide[0].count("━") > narrow[0].count("━")
    assert "bound by tokens/min" in wide[1] and "429s 2" in wide[1]  # all details on one line at 200 columns


def test_an_unset_max_tokens_that_binds_is_named_with_the_flag() -> None:
    text = "\n".join(render(busy_stats(), 80))
    assert "max_tokens is unset" in text and "4,096" in text and "--max-tokens" in text
    stats = busy_stats()
    stats.unset_max_tokens_reserve = None
    assert "--max-tokens" not in "\n".join(render(stats, 80))


async def collect_lines(fmt: str, n: int) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=80)  # not a terminal: a log
    stats = busy_stats()
    task = asyncio.create_task(show_progress(stats, console, log_every_s=0.01, log_format=fmt))
    while out.getvalue().count("\n") < n:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return out.getvalue().splitlines()


async def test_a_log_gets_a_start_line_progress_lines_and_an_end_line() -> None:
    lines = await collect_lines("text", 3)
    assert "started" in lines[0] and JOB_ID in lines[0]
    assert "ended" in lines[-1] and JOB_ID in lines[-1]
    progress = lines[1:-1]
    assert progress and all("running job " + JOB_ID in line for line in progress)
    line = progress[0]
    assert len(line) > 80  # never wrapped at a guessed width
    for part in ("1,337/10,000 rows", "committed 1,000", "answered 337", "in flight 12", "80/3,000 req/min", "bound by tokens/min", "$0.0123"):
        assert part in line, part


async def test_json_log_lines_are_one_object_each() -> None:
    lines = await collect_lines("json", 3)
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in (records[0], records[-1])] == ["start", "end"]
    assert {r["event"] for r in records[1:-1]} == {"progress"}
    r = records[1]
    assert r["job_id"] == JOB_ID and r["rows_done"] == 1_337 and r["rows_committed"] == 1_000
    assert r["rows_answered_not_committed"] == 337 and r["binding"] == "tokens/min" and "--max-tokens" in r["binding_note"]
    assert r["rpm_limit"] == 3_000 and r["requests"] == 80 and r["tokens_reserved_per_min"] > r["tokens_per_min"]
