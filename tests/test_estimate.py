"""The estimate: expected output priced beside the max_tokens worst case, where the figure comes from,
and the README's two quickstart commands being one job."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import backfill
from backfill import cli
from backfill.engine import estimate, make_plan
from backfill.engine.estimate import DEFAULT_EXPECTED_OUTPUT
from backfill.engine.plan import UNSET_MAX_TOKENS_RESERVE
from backfill.sim import SimConfig, Simulator
from backfill.spec import JobSpec, from_options
from backfill.store import Store
from conftest import make_rows, run_cli

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Row {{ id }} says: {{ text }}"


def _readme_commands() -> tuple[list[str], list[str]]:
    """The Quickstart's job-file command and the one after "or the same with flags:", as argv."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = text[text.index("## Quickstart") :]
    first = re.search(r"^ {4}(backfill run .*)$", quickstart, re.M)
    flags = re.search(r"or the same with flags:\n\n((?: {4}.*\n)+)", quickstart)
    assert first and flags, "the README's Quickstart has lost one of its two commands"
    return shlex.split(first.group(1)), shlex.split(flags.group(1).replace("\\\n", " "))


def _spec_of(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> JobSpec:
    """The JobSpec `backfill run ARGS` builds with the CLI's own parsing, stopped before it runs."""
    assert argv[:2] == ["backfill", "run"], argv
    specs: list[JobSpec] = []
    monkeypatch.setattr(cli, "_run_and_report", lambda spec, *args, **kwargs: specs.append(spec))
    result = CliRunner().invoke(cli.app, argv[1:])
    assert result.exit_code == 0, result.output
    return specs[0]


async def test_readme_quickstart_commands_are_the_same_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)  # the README's commands run from the repository's root
    by_file, by_flags = _readme_commands()
    spec_file, spec_flags = _spec_of(by_file, monkeypatch), _spec_of(by_flags, monkeypatch)
    # Every setting, limits and budget included, not only the ones the job id hashes.
    assert spec_flags.model_dump() == spec_file.model_dump()
    job_id = make_plan(spec_flags).job_id
    # `backfill estimate` names the job it estimates: the job file's is the flags' job.
    est = await run_cli("estimate", *by_file[2:], "--state-dir", str(tmp_path / "state"), cwd=ROOT)
    assert est.returncode == 0, est.stderr
    assert re.search(rf"│ job\s+│ {job_id}\s+│", est.stdout), est.stdout


def _plan(n: int = 100, **options: Any):
    options.setdefault("prompt", PROMPT)
    options.setdefault("model", "gpt-4o-mini")
    return make_plan(from_options(**options), make_rows(n))


def test_the_estimate_prices_expected_output_and_shows_the_worst_case() -> None:
    plan = _plan(100)  # no max_tokens: 4,096 output tokens are reserved a request
    est = estimate(plan)
    assert (est.expected_output_per_row, est.expected_output_source) == (DEFAULT_EXPECTED_OUTPUT, "default")
    assert est.expected_output_tokens == 100 * DEFAULT_EXPECTED_OUTPUT
    assert est.cost_usd == pytest.approx(plan.prices.cost("gpt-4o-mini", est.input_tokens, 100 * DEFAULT_EXPECTED_OUTPUT))
    assert est.max_tokens is None
    assert est.worst_case_output_tokens == 100 * UNSET_MAX_TOKENS_RESERVE
    assert est.worst_case_cost_usd == pytest.approx(plan.prices.cost("gpt-4o-mini", est.input_tokens, 100 * UNSET_MAX_TOKENS_RESERVE))
    assert est.worst_case_cost_usd > 10 * est.cost_usd

    capped = estimate(_plan(100, params={"max_tokens": 40}))
    assert (capped.expected_output_per_row, capped.max_tokens) == (40, 40)  # no answer is longer than max_tokens
    assert capped.expected_output_source == "default, capped at max_tokens 40"
    assert capped.worst_case_output_tokens == capped.expected_output_tokens == 4000

    anthropic = estimate(_plan(10, model="claude-haiku-4-5", provider="anthropic", base_url="http://127.0.0.1:9/v1", api_key_env="PATH"))
    assert anthropic.max_tokens == 1024  # the default backfill sends, not the unset reserve
    assert anthropic.worst_case_output_tokens == 10 * 1024


def test_expected_output_from_the_flag_and_never_past_the_model() -> None:
    est = estimate(_plan(50, params={"max_tokens": 100}), expected_output_tokens=12)
    assert (est.expected_output_per_row, est.expected_output_source) == (12, "--expected-output-tokens")
    assert est.expected_output_tokens == 600 and est.worst_case_output_tokens == 5000
    huge = estimate(_plan(5), expected_output_tokens=50_000)
    assert huge.expected_output_per_row == 16_384  # gpt-4o-mini's largest answer
    assert huge.expected_output_source == "--expected-output-tokens, capped at the model's max output 16,384"
    with pytest.raises(backfill.errors.SpecError, match="expected-output-tokens"):
        estimate(_plan(5), expected_output_tokens=-1)


def test_embeddings_expect_no_output_and_pack() -> None:
    est = estimate(_plan(5000, model="text-embedding-3-small", kind="embedding", prompt="{{ text }}"))
    assert (est.expected_output_tokens, est.worst_case_output_tokens, est.max_tokens) == (0, 0, None)
    assert est.expected_output_source == "embeddings have no output"
    assert est.requests == 3  # 2,048 inputs a request
    assert est.cost_usd == est.worst_case_cost_usd == pytest.approx(est.input_tokens * 0.02e-6)


async def test_the_running_mean_replaces_the_default_once_answers_arrive(tmp_path: Path) -> None:
    rows = make_rows(30)
    state = tmp_path / "state"
    async with Simulator(SimConfig(latency_s=0.0)) as sim:
        options = dict(prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url, output=str(tmp_path / "o.parquet"))
        spec = from_options(**options)
        store = Store(state / "backfill.db")
        try:
            before = estimate(make_plan(spec, rows), store)
        finally:
            store.close()
        assert before.expected_output_source == "default"
        await backfill.arun(rows, state_dir=state, progress=False, return_type="path", **options)
    answered = pq.read_table(tmp_path / "o.parquet").column("output_tokens").to_pylist()
    store = Store(state / "backfill.db")
    try:
        after = estimate(make_plan(spec, rows, store=store), store)  # the store knows the output is the job's
    finally:
        store.close()
    assert after.rows_cached == 30 and after.expected_output_tokens == 0  # nothing left to pay for
    assert after.expected_output_source == "running mean of 30 answers"
    assert after.expected_output_per_row == round(sum(answered) / 30) != DEFAULT_EXPECTED_OUTPUT


async def test_the_estimate_counts_as_free_only_answers_in_the_jobs_cache_scope(tmp_path: Path) -> None:
    from backfill import engine

    rows, state = make_rows(30), tmp_path / "state"
    spec = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", output=str(tmp_path / "o.parquet"))
    result = await engine.run_job(spec, data=rows, state_dir=state, cache_scope="owner:alice")
    assert result.status.value == "succeeded"
    other = from_options(prompt=PROMPT, model="gpt-4o-mini", provider="sim", output=str(tmp_path / "bob.parquet"))
    store = Store(state / "backfill.db")
    try:
        plan = make_plan(other, rows, store=store)
        assert estimate(plan, store, scope="owner:alice").rows_cached == 30
        assert estimate(plan, store, scope="owner:bob").rows_cached == 0  # bob learns nothing of alice's prompts
    finally:
        store.close()
