"""The core job against the simulator over HTTP: correctness, faults, fatal errors, budgets, limits, embeddings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import backfill
from backfill.errors import BudgetExceeded, FatalProviderError, SpecError
from backfill.sim import Faults, KeyLimits, Outage, SimConfig, Simulator
from conftest import make_rows, run_cli

PROMPT = "Row {{ id }} says: {{ text }}"


def assert_rows_belong(table: pa.Table, expected_ids: list[str]) -> None:
    """Each input row exactly once, and each answer is the answer to its own row."""
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected_ids)
    assert len(set(ids)) == len(ids)
    for rid, output, status in zip(ids, table.column("output").to_pylist(), table.column("status").to_pylist()):
        if status == "ok":
            assert output.startswith(f"Answer to «Row {rid} says:"), (rid, output)


async def test_python_cli_and_job_file_give_the_same_table(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(2000)
    async with Simulator(SimConfig(latency_s=0.005)) as sim:
        common = dict(provider="sim", base_url=sim.base_url, id_column="id", columns=["text"], params={"max_tokens": 40}, chunk_size=250)
        frame = await backfill.arun(str(src), prompt=PROMPT, model="gpt-4o-mini", state_dir=tmp_path / "s1", return_type="arrow", progress=False, **common)
        assert_rows_belong(frame, make_rows(2000).column("id").to_pylist())
        assert set(frame.column("status").to_pylist()) == {"ok"}

        cli = await run_cli(
            "run", "--input", str(src), "--id-column", "id", "--columns", "text", "--prompt", PROMPT, "--model", "gpt-4o-mini",
            "--provider", "sim", "--base-url", sim.base_url, "--max-tokens", "40", "--chunk-size", "250",
            "--output", str(tmp_path / "cli.parquet"), "--state-dir", str(tmp_path / "s2"), "--quiet",
        )
        assert cli.returncode == 0, cli.stderr

        job = tmp_path / "job.toml"
        job.write_text(
            f'chunk_size = 250\n[input]\npath = "{src}"\nid_column = "id"\n'
            f'[task]\nprovider = "sim"\nbase_url = "{sim.base_url}"\nmodel = "gpt-4o-mini"\nprompt = "{PROMPT}"\n'
            f'[task.params]\nmax_tokens = 40\n[output]\npath = "file.parquet"\ncolumns = ["text"]\n'
        )
        by_file = await run_cli("run", str(job), "--state-dir", str(tmp_path / "s3"), "--quiet")
        assert by_file.returncode == 0, by_file.stderr

    from_cli = pq.read_table(tmp_path / "cli.parquet")
    from_file = pq.read_table(tmp_path / "file.parquet")
    assert from_cli.equals(frame)
    assert from_file.equals(frame)


async def test_faults_storm_completes_with_every_row_accounted(tmp_path: Path) -> None:
    faults = Faults(error_500=0.1, hang=0.02, hang_s=3.0, reset=0.03, malformed=0.03)
    config = SimConfig(latency_s=0.01, faults=faults, outages=[Outage(0.3, 1.3, 429)], seed=3)
    async with Simulator(config) as sim:
        out = await backfill.arun(
            make_rows(600).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
            id_column="id", state_dir=tmp_path, return_type="arrow", progress=False, timeout_s=1.0,
            max_attempts=8, chunk_size=100, params={"max_tokens": 30},
        )
        events = sim.log.count_by_event()
    assert_rows_belong(out, make_rows(600).column("id").to_pylist())
    statuses = out.column("status").to_pylist()
    errors = out.column("error").to_pylist()
    assert all(s == "ok" or (s == "failed" and e) for s, e in zip(statuses, errors))
    assert statuses.count("ok") >= 590  # 8 attempts make giving up on a row very unlikely
    for fault in ("500", "hang", "reset", "malformed", "outage"):
        assert events[fault] > 0, f"the storm had no {fault}"


async def test_rejected_key_stops_the_job_within_a_handful_of_requests(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEY", "sk-wrong-key-123")
    async with Simulator(SimConfig(keys={"sk-right": KeyLimits()}, latency_s=0.01)) as sim:
        with pytest.raises(FatalProviderError) as e:
            await backfill.arun(
                make_rows(2000).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="openai", base_url=sim.base_url,
                api_key_env="TEST_KEY", state_dir=tmp_path, progress=False,
            )
        sent = len(sim.log)
    assert "401" in str(e.value) and "$TEST_KEY" in str(e.value)
    assert "sk-wrong-key-123" not in str(e.value)
    assert sent <= 10


async def test_unknown_template_variable_fails_before_any_request(tmp_path: Path) -> None:
    async with Simulator(SimConfig()) as sim:
        with pytest.raises(SpecError, match="nosuchcolumn"):
            await backfill.arun(
                make_rows(50).to_pandas(), prompt="Hi {{ nosuchcolumn }}", model="gpt-4o-mini", provider="sim",
                base_url=sim.base_url, state_dir=tmp_path, progress=False,
            )
        assert len(sim.log) == 0


async def test_budget_refuses_over_estimate_and_stops_at_the_budget(tmp_path: Path) -> None:
    rows = make_rows(400).to_pandas()
    kwargs = dict(
        prompt=PROMPT, model="gpt-4o-mini", id_column="id", state_dir=tmp_path, progress=False, chunk_size=50,
        params={"max_tokens": 2000}, max_in_flight=8,
    )
    async with Simulator(SimConfig(latency_s=0.005, output_tokens_mean=1500, output_tokens_sigma=0.1)) as sim:
        kwargs.update(provider="sim", base_url=sim.base_url)
        with pytest.raises(BudgetExceeded, match="estimated cost"):
            await backfill.arun(rows, budget_usd=0.05, **kwargs)
        assert len(sim.log) == 0

        with pytest.raises(BudgetExceeded, match="stopped: budget"):
            await backfill.arun(rows, budget_usd=0.05, allow_partial=True, **kwargs)
        paid = sum(e.charged_tokens for e in sim.log.entries if e.status == 200)
        assert 0 < len(sim.log) < 400
        # Spend is what the answers cost: never past the budget.
        from backfill.engine import open_store

        store = open_store(tmp_path)
        job = store.list_jobs()[0]
        store.close()
        assert 0 < job.spent_usd <= 0.05
        assert job.status == "paused" and job.reason.startswith("stopped: budget")
        assert paid > 0

        sent_before = len(sim.log)
        out = await backfill.arun(rows, budget_usd=1.0, allow_partial=True, return_type="arrow", **kwargs)
        assert out.num_rows == 400 and set(out.column("status").to_pylist()) == {"ok"}
        assert sim.log.duplicates() == {}  # nothing answered before the stop was paid for again
        assert len(sim.log) - sent_before < 400


async def test_limits_configured_at_the_servers_meet_no_429s(tmp_path: Path) -> None:
    # Whether the limits are kept is counted from what was sent in test_limits_sent.py, against a
    # sim that refuses nothing; here the server enforces the same limits, and must refuse nothing.
    # The server runs on its own thread and loop, as a provider runs elsewhere: on the job's loop, a
    # stall of the job's (a commit's fsync on a loaded machine) would hold the server's arrivals back
    # and hand them to its one-second bucket at once.
    limits = KeyLimits(rpm=3000, tpm=300_000)
    with Simulator(SimConfig(default_limits=limits, latency_s=0.02)) as sim:
        out = await backfill.arun(
            make_rows(300).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
            rpm=3000, tpm=300_000, params={"max_tokens": 50}, state_dir=tmp_path, progress=False, return_type="arrow",
        )
        statuses = sim.log.count_by_status()
    assert out.num_rows == 300
    assert statuses[429] == 0


async def test_limits_learned_from_headers_give_few_429s(tmp_path: Path) -> None:
    async with Simulator(SimConfig(default_limits=KeyLimits(rpm=3000, tpm=1_000_000), latency_s=0.02)) as sim:
        out = await backfill.arun(
            make_rows(300).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
            params={"max_tokens": 50}, state_dir=tmp_path, progress=False, return_type="arrow",
        )
        statuses = sim.log.count_by_status()
    assert out.num_rows == 300 and set(out.column("status").to_pylist()) == {"ok"}
    assert statuses[429] <= 0.02 * 300


async def test_embeddings_are_packed_into_batched_requests(tmp_path: Path) -> None:
    async with Simulator(SimConfig(embedding_dim=32)) as sim:
        out = await backfill.arun(
            make_rows(5000).to_pandas(), prompt="{{ text }}", model="text-embedding-3-small", kind="embedding",
            provider="sim", base_url=sim.base_url, id_column="id", state_dir=tmp_path, progress=False,
            return_type="arrow", params={"dimensions": 32},
        )
        requests = [e for e in sim.log.entries if e.path.endswith("/embeddings")]
    assert out.num_rows == 5000
    assert len(set(out.column("id").to_pylist())) == 5000
    vectors = out.column("embedding").to_pylist()
    assert all(len(v) == 32 for v in vectors)
    assert len(requests) <= 10  # 5,000 rows in a few requests, not 5,000
    # the same text gets the same vector, different texts different ones
    by_text: dict[str, list[float]] = {}
    for text, vector in zip(make_rows(5000).column("text").to_pylist(), vectors):
        assert by_text.setdefault(text, vector) == vector
    assert len({tuple(v) for v in by_text.values()}) == len(by_text)


async def test_structured_output_becomes_typed_columns_over_anthropic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SIM_ANTHROPIC_KEY", "sk-ant-sim")
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["good", "bad"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
            "summary": {"type": "string", "maxLength": 60},
        },
        "required": ["label", "score", "summary"],
    }
    async with Simulator(SimConfig(latency_s=0.005)) as sim:
        out = await backfill.arun(
            make_rows(200).to_pandas(), prompt=PROMPT, model="claude-haiku-4-5", provider="anthropic", base_url=sim.url,
            api_key_env="SIM_ANTHROPIC_KEY", schema=schema, id_column="id", state_dir=tmp_path, progress=False,
            return_type="arrow", input_tpm=400_000, output_tpm=80_000, rpm=3000, params={"max_tokens": 100},
        )
        paths = {e.path for e in sim.log.entries}
    assert paths == {"/v1/messages"}
    assert out.schema.field("label").type == pa.string()
    assert out.schema.field("score").type == pa.int64()
    assert set(out.column("status").to_pylist()) == {"ok"}
    assert set(out.column("label").to_pylist()) <= {"good", "bad"}
    assert all(1 <= v <= 5 for v in out.column("score").to_pylist())
    # string fields echo the prompt, so each answer belongs to its row
    for rid, summary in zip(out.column("id").to_pylist(), out.column("summary").to_pylist()):
        head = f"Row {rid} says:"
        assert summary.startswith(head) or (summary and head.startswith(summary)), (rid, summary)


def test_estimate_counts_exact_tokens_without_sending(tmp_path: Path) -> None:
    from backfill.engine import estimate, make_plan
    from backfill.spec import from_options
    from backfill.tokens import count_messages

    table = make_rows(120)
    spec = from_options(prompt=PROMPT, model="gpt-4o-mini", params={"max_tokens": 10}, rpm=60)
    plan = make_plan(spec, table)
    est = estimate(plan)
    expected = sum(count_messages([{"role": "user", "content": f"Row {r['id']} says: {r['text']}"}]) for r in table.to_pylist())
    assert est.rows == 120 and est.requests == 120
    assert est.input_tokens == expected
    assert est.expected_output_tokens == 1200
    assert est.min_duration_s == pytest.approx(120.0)
    assert est.cost_usd == pytest.approx(plan.prices.cost("gpt-4o-mini", expected, 1200))
    assert json.dumps(est.__dict__)


@pytest.mark.parametrize(
    "options",
    [
        dict(model="gpt-4o-mini", params={"max_tokens": 10, "temperature": 0.5, "stop": ["ü"]}, schema={"type": "object", "properties": {"a": {"type": "string"}}}),
        dict(model="claude-3-5-haiku-latest", provider="anthropic", system="Sé breve."),
        dict(model="text-embedding-3-small", kind="embedding"),
    ],
)
def test_request_keys_are_the_defined_hash(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan serializes the job's part of a request key once; keys must stay those `request_key`
    defines, or every cache written before would be paid for again."""
    from backfill.engine import make_plan
    from backfill.engine.plan import request_key
    from backfill.spec import from_options

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    table = pa.table({"id": ["a", "b"], "text": ["naïve — ünïcode 漢字", 'quotes " and \\ backslash']})
    spec = from_options(prompt=PROMPT, **options)
    plan = make_plan(spec, table)
    keys = []
    for row in table.to_pylist():
        request = plan.build_request(row)
        body = request.input if request.kind == "embedding" else request.messages
        task = spec.task
        assert request.key == request_key(task.provider, plan.endpoint, task.model, body, request.params, task.schema_)
        keys.append(request.key)
    assert len(set(keys)) == 2


async def test_chat_rows_are_rendered_ahead_only_as_far_as_the_slots_need(tmp_path: Path) -> None:
    from backfill.engine import JobRunner, run_job
    from backfill.spec import from_options

    longest = 0
    sampler: list[asyncio.TimerHandle] = []

    def sample(runner: JobRunner) -> None:
        nonlocal longest
        longest = max(longest, len(runner.dispatcher.queue))
        sampler[:] = [asyncio.get_running_loop().call_later(0.002, sample, runner)]

    async with Simulator(SimConfig(latency_s=0.01)) as sim:
        spec = from_options(
            prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, id_column="id",
            max_in_flight=4, chunk_size=50,
        )
        result = await run_job(spec, data=make_rows(400), state_dir=tmp_path, on_start=sample)
        sampler[0].cancel()
    assert result.status == "succeeded" and result.stats.rows_ok == 400
    # One chunk beyond the in-flight cap at most; unchecked, the producer queues 16 chunks (800 rows).
    assert 4 <= longest <= 4 + 50


@pytest.mark.parametrize("linger_s", [0.0, 0.05])
async def test_embedding_requests_wait_briefly_for_a_full_pack(tmp_path: Path, monkeypatch, linger_s: float) -> None:
    from backfill.engine import dispatch

    monkeypatch.setattr(dispatch, "PACK_LINGER_S", linger_s)
    async with Simulator(SimConfig(embedding_dim=8)) as sim:
        out = await backfill.arun(
            make_rows(6000).to_pandas(), prompt="{{ id }}: {{ text }}", model="text-embedding-3-small", kind="embedding",
            provider="sim", base_url=sim.base_url, id_column="id", state_dir=tmp_path, progress=False,
            return_type="arrow", params={"dimensions": 8}, chunk_size=100,
        )
        requests = [e for e in sim.log.entries if e.path.endswith("/embeddings")]
    assert out.num_rows == 6000 and set(out.column("status").to_pylist()) == {"ok"}
    if linger_s:
        assert len(requests) <= 10  # up to 2,048 rows a request (53 requests without the wait, measured)
    else:
        assert len(requests) > 20  # without the wait, a request takes about what one 100-row chunk queued
