"""The core's promises under faults: supervised tasks, endpoint-scoped cache keys, one runner per job,
a rebuilt output, one truth for spend, commit order, oversize rows and early stops."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import backfill
from backfill.engine import JobRunner, make_plan, run_job
from backfill.errors import FatalProviderError, SpecError
from backfill.sim import Faults, KeyLimits, ModelInfo, SimConfig, Simulator
from backfill.spec import from_options
from backfill.status import JobStatus, StopCause
from backfill.store import Store
from conftest import make_rows, run_cli

PROMPT = "Summarize {{ id }}: {{ text }}"  # the id makes every prompt distinct
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "label": {"type": "string"}}, "required": ["n", "label"]}


def _cli_run(sim: Simulator, src: Path, out: Path, state: Path, *extra: str, prompt: str = PROMPT, max_tokens: int = 30) -> list[str]:
    return ["run", "--input", str(src), "--id-column", "id", "--prompt", prompt, "--model", "gpt-4o-mini",
            "--base-url", sim.base_url, "--max-tokens", str(max_tokens), "--output", str(out), "--state-dir", str(state),
            "--quiet", *extra]


def _opts(sim: Simulator, tmp_path: Path, **extra):
    return dict(
        prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id",
        state_dir=tmp_path / "state", progress=False, return_type="arrow", **extra,
    )


# --- 1. supervised tasks: no hang, a value that does not fit is a dead letter ------------------------

def test_a_schema_json_cannot_carry_is_refused_before_any_request(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**20}}, "required": ["n"]}
    with Simulator(SimConfig()) as sim:
        with pytest.raises(SpecError, match="cannot be sent as JSON"):
            backfill.run(make_rows(5).to_pandas(), schema=schema, **_opts(sim, tmp_path))
        assert len(sim.log) == 0


async def test_answers_beyond_int64_are_dead_letters_and_resume_does_not_wedge(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 9.3e18}}, "required": ["n"]}
    async with Simulator(SimConfig()) as sim:
        opts = _opts(sim, tmp_path, schema=schema, chunk_size=10)
        out = await asyncio.wait_for(backfill.arun(make_rows(20).to_pandas(), **opts), 30)
        assert out.num_rows == 20
        assert set(out.column("status").to_pylist()) == {"failed"}
        assert all("does not fit the column's type int64" in e for e in out.column("error").to_pylist())
        paid = len(sim.log)
        # Run again with the answers in the cache: the same dead letters, nothing sent, no wedge.
        (tmp_path / "state" / "jobs").rename(tmp_path / "old-parts")
        again = await asyncio.wait_for(backfill.arun(make_rows(20).to_pandas(), **opts), 30)
        assert again.column("status").to_pylist() == ["failed"] * 20 and len(sim.log) == paid


def test_embeddings_with_an_adapter_that_has_none_fail_at_plan_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    spec = from_options(prompt=PROMPT, model="claude-3-5-haiku-latest", provider="anthropic", kind="embedding")
    with pytest.raises(SpecError, match="no embeddings"):
        make_plan(spec, make_rows(3))


async def test_a_ledger_that_cannot_be_written_fails_the_job_with_one_sentence_and_resume_finishes(tmp_path: Path) -> None:
    rows = make_rows(300)
    async with Simulator(SimConfig(latency_s=0.01)) as sim:
        spec = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id", chunk_size=50, max_in_flight=8)

        def disk_full(runner: JobRunner) -> None:
            # SQLite's own "database or disk is full", as a full disk gives it, from the next page on.
            pages = runner.store._db.execute("PRAGMA page_count").fetchone()[0]
            runner.store._db.execute(f"PRAGMA max_page_count = {pages}")

        result = await asyncio.wait_for(run_job(spec, data=rows, state_dir=tmp_path, on_start=disk_full), 30)
        assert result.status is JobStatus.FAILED and result.cause is StopCause.FATAL
        assert result.reason is not None and "could not be written" in result.reason and "\n" not in result.reason
        store = Store(tmp_path / "backfill.db")
        assert store.get_job(result.job_id).status is JobStatus.FAILED
        store.close()
        again = await asyncio.wait_for(run_job(spec, data=rows, state_dir=tmp_path), 30)
        assert again.status is JobStatus.SUCCEEDED
        ids = pq.read_table(again.output_path).column("id").to_pylist()
        assert sorted(ids) == sorted(rows.column("id").to_pylist())


# --- 2. the request key names the endpoint ----------------------------------------------------------

async def test_a_second_server_gets_its_own_requests_and_checks_its_own_key(tmp_path: Path, monkeypatch) -> None:
    rows = make_rows(30).to_pandas()
    monkeypatch.setenv("SIM_KEY", "key-a")
    async with Simulator(SimConfig()) as a, Simulator(SimConfig(keys={"key-b": KeyLimits()})) as b:
        common = dict(prompt=PROMPT, model="gpt-4o-mini", provider="openai", id_column="id", api_key_env="SIM_KEY",
                      state_dir=tmp_path, progress=False, return_type="arrow", prices={"gpt-4o-mini": {"input": 0.15, "output": 0.6}})
        await backfill.arun(rows, base_url=a.base_url, **common)
        assert len(a.log) == 30
        # The same job against another server: none of a's answers may serve it, and b refuses our key.
        with pytest.raises(FatalProviderError, match="401"):
            await backfill.arun(rows, base_url=b.base_url, **common)
        assert len(b.log) >= 1 and all(e.status == 401 for e in b.log.entries)
        monkeypatch.setenv("SIM_KEY", "key-b")
        await backfill.arun(rows, base_url=b.base_url, **common)
        assert sum(e.status == 200 for e in b.log.entries) == 30


@pytest.mark.parametrize(
    ("options", "digest"),
    [
        (dict(model="gpt-4o-mini"), "PIN_SIM"),
        (dict(model="gpt-4o-mini", provider="openai", base_url="http://10.0.0.7:8000/v1/"), "PIN_VLLM"),
        (dict(model="text-embedding-3-small", kind="embedding"), "PIN_EMBED"),
    ],
)
def test_request_key_digests_are_pinned(options: dict, digest: str) -> None:
    """A change that alters every request key orphans every cache: it must be deliberate."""
    spec = from_options(prompt="Say: {{ text }}", **options)
    plan = make_plan(spec, pa.table({"text": ["hello"]}))
    assert plan.build_request({"text": "hello"}).key == PINS[digest]


PINS = {
    "PIN_SIM": "8eb123cf098ea93d2789f2154e745f7b24a2e30f613b0f6190620e2b3341a226",
    "PIN_VLLM": "0a4bf0b19337135b0c5e8d0a90855067cb1d5392e9b2977f508bcfd4df3916dc",
    "PIN_EMBED": "4d675e06274b6e6b7e6b8ef4d800e53d9dd4899bdf9419b93f9a16187dddb117",
}


# --- 3. one runner per job --------------------------------------------------------------------------

async def test_a_second_run_of_a_running_job_exits_6_naming_the_holder_and_wait_finishes(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(200)
    out, state = tmp_path / "out.parquet", tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.2)) as sim:
        args = _cli_run(sim, src, out, state, "--max-in-flight", "8", "--chunk-size", "20")
        first = await asyncio.create_subprocess_exec(sys.executable, "-m", "backfill", *args, stderr=asyncio.subprocess.PIPE)
        while len(sim.log) < 10 and first.returncode is None:
            await asyncio.sleep(0.02)
        second = await run_cli(*args)
        assert second.returncode == 6, second.stderr
        assert f"{first.pid}@" in second.stderr and "--wait" in second.stderr
        waited = await run_cli(*args, "--wait", timeout=120)
        await first.wait()
        assert first.returncode == 0 and waited.returncode == 0, waited.stderr
    assert len(sim.log) == 200  # every row paid once, whoever ran it
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(pq.read_table(src).column("id").to_pylist())


# --- 6. a finished job whose output was deleted ------------------------------------------------------

async def test_a_deleted_output_is_rebuilt_from_the_ledger_without_a_request(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(120)
    out, state = tmp_path / "out.parquet", tmp_path / "state"
    async with Simulator(SimConfig(models={"gpt-4o-mini": ModelInfo(context_window=40)})) as sim:
        args = _cli_run(sim, src, out, state, "--chunk-size", "25", prompt="{{ text }}", max_tokens=20)
        first = await run_cli(*args)
        assert first.returncode == 0, first.stderr
        before = pq.read_table(out).sort_by("id")
        sent = len(sim.log)
        out.unlink()
        again = await run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert len(sim.log) == sent
    after = pq.read_table(out).sort_by("id")
    assert after.column("status").to_pylist() == before.column("status").to_pylist()
    assert after.column("output").to_pylist() == before.column("output").to_pylist()
    assert after.column("cached").to_pylist() == [True] * 120 or "failed" in before.column("status").to_pylist()


# --- 7. one truth for spend -------------------------------------------------------------------------

async def test_every_billed_answer_counts_and_the_cost_column_sums_to_the_ledger(tmp_path: Path) -> None:
    from backfill.cost import PriceTable

    price = PriceTable.builtin().get("gpt-4o-mini")
    rows = pa.concat_tables([make_rows(40), make_rows(10)])  # ten rows repeat: answered once
    async with Simulator(SimConfig(faults=Faults(truncate=0.5), seed=3)) as sim:
        out = await backfill.arun(rows.to_pandas(), schema=SCHEMA, **{**_opts(sim, tmp_path, chunk_size=10), "id_column": None, "params": {"max_tokens": 40}})
        billed = sum(price.cost(e.prompt_tokens, e.output_tokens) for e in sim.log.entries if e.status == 200)
    store = Store(tmp_path / "state" / "backfill.db")
    job = store.list_jobs()[0]
    store.close()
    assert job.spent_usd == pytest.approx(billed, rel=1e-9)
    assert sum(out.column("cost_usd").to_pylist()) == pytest.approx(billed, rel=1e-9)
    cached = out.column("cached").to_pylist()
    assert sum(cached) >= 10  # the repeats paid nothing
    assert all(c == 0 for c, hit in zip(out.column("cost_usd").to_pylist(), cached) if hit)


# --- 8. crash windows -------------------------------------------------------------------------------

async def test_a_chunk_part_is_written_only_after_its_answers_are_in_the_ledger(tmp_path: Path) -> None:
    seen: list[bool] = []
    async with Simulator(SimConfig(latency_s=0.005)) as sim:
        spec = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id", chunk_size=20)

        def watch(runner: JobRunner) -> None:
            sink, db = runner._sink, sqlite3.connect(tmp_path / "backfill.db")
            write = sink.write_chunk

            written = [0]

            def observed(index: int, table: pa.Table) -> None:
                # What a kill right now would leave: committed answers, seen from another connection,
                # must hold every answer of the parts written so far, this one included.
                written[0] += sum(s == "ok" for s in table.column("status").to_pylist())
                seen.append(db.execute("SELECT count(*) FROM cache").fetchone()[0] >= written[0])
                write(index, table)

            sink.write_chunk = observed  # type: ignore[method-assign]

        result = await run_job(spec, data=make_rows(100), state_dir=tmp_path, on_start=watch)
    assert result.status is JobStatus.SUCCEEDED and seen and all(seen)


async def test_request_counts_survive_a_kill(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(600)
    state = tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.01)) as sim:
        args = _cli_run(sim, src, tmp_path / "o.parquet", state, "--chunk-size", "20", "--max-in-flight", "4")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "backfill", *args, stderr=asyncio.subprocess.DEVNULL)
        while len(sim.log) < 200 and proc.returncode is None:
            await asyncio.sleep(0.01)
        assert proc.returncode is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    store = Store(state / "backfill.db")
    job = store.list_jobs()[0]
    store.close()
    assert job.requests >= job.rows_done > 0


# --- 9. a row that cannot fit -----------------------------------------------------------------------

async def test_an_oversize_row_is_a_dead_letter_before_sending_and_holds_nothing_back(tmp_path: Path) -> None:
    texts = make_rows(30).column("text").to_pylist()
    texts[7] = "word " * 200_000  # a million characters
    table = pa.table({"id": [f"r{i}" for i in range(30)], "text": texts})
    async with Simulator(SimConfig()) as sim:
        out = await backfill.arun(table.to_pandas(), **_opts(sim, tmp_path, tpm=200_000, params={"max_tokens": 20}))
        assert len(sim.log) == 29 and max(e.prompt_tokens for e in sim.log.entries) < 100
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["r7"]["status"] == "failed" and "too long for the model" in rows["r7"]["error"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 29


async def test_a_row_beyond_the_lanes_token_limit_is_a_dead_letter(tmp_path: Path) -> None:
    texts = make_rows(10).column("text").to_pylist()
    texts[3] = "word " * 30_000
    table = pa.table({"id": [f"r{i}" for i in range(10)], "text": texts})
    async with Simulator(SimConfig()) as sim:
        out = await backfill.arun(table.to_pandas(), **_opts(sim, tmp_path, tpm=20_000, params={"max_tokens": 20}))
        assert len(sim.log) == 9
    rows = {r["id"]: r for r in out.to_pylist()}
    assert "too large for the lane's limit" in rows["r3"]["error"]


# --- 11. a failure that repeats identically stops the job early -------------------------------------

async def test_a_deterministic_500_stops_the_job_early(tmp_path: Path) -> None:
    async with Simulator(SimConfig(faults=Faults(error_500=1.0))) as sim:
        with pytest.raises(FatalProviderError, match="first 20 requests all failed the same way"):
            await backfill.arun(make_rows(500).to_pandas(), **_opts(sim, tmp_path, max_in_flight=4))
        assert len(sim.log) < 40


async def test_the_working_structured_mode_is_remembered_per_endpoint_and_model(tmp_path: Path) -> None:
    async with Simulator(SimConfig(reject_json_schema=422)) as sim:
        opts = _opts(sim, tmp_path, schema=SCHEMA, max_in_flight=2, params={"max_tokens": 50})
        out = await backfill.arun(make_rows(20).to_pandas(), **opts)
        assert set(out.column("status").to_pylist()) == {"ok"}
        rejected = sum(e.status == 422 for e in sim.log.entries)
        assert 1 <= rejected <= 2
        store = Store(tmp_path / "state" / "backfill.db")
        assert store.get_structured_mode(f"sim|{sim.base_url.rstrip('/')}", "gpt-4o-mini") == "json_object_schema"
        store.close()
        # A new job on the same endpoint and model starts in the mode that works.
        await backfill.arun(make_rows(20, start=100).to_pandas(), **opts)
        assert sum(e.status == 422 for e in sim.log.entries) == rejected
    store = Store(tmp_path / "state" / "backfill.db")
    job = store.list_jobs()[0]
    store.close()
    shown = await run_cli("status", job.id, "--json", "--state-dir", str(tmp_path / "state"))
    assert json.loads(shown.stdout)["structured_mode"] == "json_object_schema"


def test_status_and_cause_are_enums_in_the_ledger(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    store.upsert_job("j1", owner="me", spec={}, input_fingerprint="f")
    store.set_status("j1", JobStatus.PAUSED, "stopped: budget", StopCause.BUDGET)
    job = store.get_job("j1")
    store.close()
    assert job.status is JobStatus.PAUSED and job.stop_cause is StopCause.BUDGET


async def test_ctrl_c_pauses_with_cause_interrupt_and_exit_130(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(400)
    state = tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.1)) as sim:
        args = _cli_run(sim, src, tmp_path / "o.parquet", state, "--max-in-flight", "4")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "backfill", *args, stderr=asyncio.subprocess.DEVNULL)
        while len(sim.log) < 10 and proc.returncode is None:
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 130
    store = Store(state / "backfill.db")
    job = store.list_jobs()[0]
    store.close()
    assert job.status is JobStatus.PAUSED and job.stop_cause is StopCause.INTERRUPT


async def test_cache_clear_by_job_and_no_cache(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(20)
    state = tmp_path / "state"
    async with Simulator(SimConfig()) as sim:
        def args(out: str, *extra: str) -> list[str]:
            return _cli_run(sim, src, tmp_path / out, state, *extra)
        assert (await run_cli(*args("a.parquet"))).returncode == 0
        assert (await run_cli(*args("b.parquet"))).returncode == 0  # another job (another output): all from the cache
        assert len(sim.log) == 20
        assert (await run_cli(*args("c.parquet", "--no-cache"))).returncode == 0  # other jobs' answers not reused
        assert len(sim.log) == 40
        store = Store(state / "backfill.db")
        fresh = [j for j in store.list_jobs() if j.spec["output"]["path"].endswith("c.parquet")][0]
        store.close()
        # The answers the run without the cache paid for are its own now: a resume of it reuses them.
        cleared = await run_cli("cache", "clear", "--job", fresh.id[:8], "--state-dir", str(state))
        assert cleared.returncode == 0 and "removed 20" in cleared.stdout
        assert "removed 0" in (await run_cli("cache", "clear", "--state-dir", str(state))).stdout
        bad = await run_cli("cache", "clear", "--older-than", "soon", "--state-dir", str(state))
        assert bad.returncode == 2 and "30d" in bad.stderr


async def test_an_exhausted_quota_stops_the_job_with_cause_quota(tmp_path: Path) -> None:
    async with Simulator(SimConfig(default_limits=KeyLimits(quota_exhausted=True))) as sim:
        spec = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id")
        result = await run_job(spec, data=make_rows(20), state_dir=tmp_path)
    assert result.status is JobStatus.FAILED and result.cause is StopCause.QUOTA and "quota" in (result.reason or "")


async def test_a_job_that_leaves_a_lane_leaves_no_fair_share_state() -> None:
    from backfill.engine.fairshare import FairShare
    from backfill.limits import LaneLimits, Limiter

    fair = FairShare(Limiter(LaneLimits(rpm=600_000)))
    for i in range(200):
        view = fair.for_job(f"job-{i}")
        view.release(await view.acquire(0, 0))
        fair.leave(f"job-{i}")
    assert fair._shares == {} and fair.admitted == {}
    await fair.close()


async def test_a_run_cancelled_by_its_caller_is_recorded_as_paused(tmp_path: Path) -> None:
    async with Simulator(SimConfig(latency_s=0.3)) as sim:
        spec = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id", max_in_flight=2)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run_job(spec, data=make_rows(200), state_dir=tmp_path), 1.0)
    store = Store(tmp_path / "backfill.db")
    job = store.list_jobs()[0]
    store.close()
    assert job.status is JobStatus.PAUSED and job.stop_cause is StopCause.INTERRUPT and job.lease_holder is None


async def test_two_runs_of_one_job_in_one_process_are_one_runner(tmp_path: Path) -> None:

    async with Simulator(SimConfig(latency_s=0.05)) as sim:
        spec = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id")
        results = await asyncio.gather(
            run_job(spec, data=make_rows(100), state_dir=tmp_path), run_job(spec, data=make_rows(100), state_dir=tmp_path),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["JobBusy", "RunResult"]
        assert len(sim.log) == 100


async def test_an_input_that_shrinks_while_the_job_runs_fails_it_with_a_sentence(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(make_rows(100), src)
    async with Simulator(SimConfig()) as sim:
        spec = from_options(input=str(src), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
                            id_column="id", chunk_size=10, output=str(tmp_path / "out.parquet"))

        def shrink(runner: JobRunner) -> None:
            pq.write_table(make_rows(35), src)  # after the plan counted 100 rows

        result = await asyncio.wait_for(run_job(spec, state_dir=tmp_path / "state", on_start=shrink), 30)
    assert result.status is JobStatus.FAILED and "input changed" in (result.reason or "")


def test_early_stop_tells_failures_apart_by_the_error_code() -> None:
    from backfill.engine.policy import failure_signature
    from backfill.request import Outcome, OutcomeKind

    too_long = Outcome(OutcomeKind.BAD_ROW, status=400, error="22 tokens", code="context_length_exceeded")
    other = Outcome(OutcomeKind.BAD_ROW, status=400, error="31 tokens", code="invalid_value")
    assert failure_signature(too_long) == failure_signature(Outcome(OutcomeKind.BAD_ROW, status=400, error="9", code="context_length_exceeded"))
    assert failure_signature(too_long) != failure_signature(other)
    assert failure_signature(Outcome(OutcomeKind.BAD_ROW, status=200, error="refused")) is None
    assert failure_signature(Outcome(OutcomeKind.RETRY, status=0, error="timeout")) is None
