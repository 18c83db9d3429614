"""`backfill requests JOB [ROW_ID]`: the request re-rendered from the spec and the input, its request key and the
cached answer, as the job's run saw them; secrets never shown; a frame's job says why it cannot be shown."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import backfill
from backfill import engine
from backfill.errors import BackfillError
from backfill.inspect import RowState, job_requests
from backfill.sim import SimConfig, Simulator
from backfill.spec import build_spec
from backfill.status import JobStatus
from backfill.store import Store
from conftest import make_rows, run_cli

PROMPT = "Row {{ id }} says: {{ text }}"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}, "score": {"type": "integer"}}, "required": ["label", "score"]}
SECRET = "hunter2-pw"


async def test_requests_shows_what_was_sent_and_what_came_back_without_secrets(tmp_path: Path, rows_parquet) -> None:
    src = rows_parquet(40)
    state, out = tmp_path / "state", tmp_path / "out.parquet"
    async with Simulator(SimConfig(latency_s=0.001)) as sim:
        # The password in the base URL is a secret: it goes out as the Authorization header.
        spec = build_spec({
            "input": {"path": str(src), "id_column": "id"},
            "task": {
                "model": "gpt-4o-mini", "provider": "openai", "base_url": sim.base_url.replace("http://", f"http://user:{SECRET}@"),
                "prompt": PROMPT, "system": "Be brief.", "schema": SCHEMA, "params": {"max_tokens": 30},
            },
            "output": {"path": str(out)},
            "chunk_size": 10,
        })
        ran = await engine.run_job(spec, state_dir=state)
    assert ran.status is JobStatus.SUCCEEDED
    output = {r["id"]: r for r in pq.read_table(out).to_pylist()}

    store = engine.open_store(state)
    try:
        record, (row,) = job_requests(store, ran.job_id[:6], "id-000017")
    finally:
        store.close()
    assert record.id == ran.job_id
    assert (row.row_id, row.chunk, row.state) == ("id-000017", 1, RowState.ANSWERED)
    text = make_rows(40).column("text").to_pylist()[17]
    assert row.request is not None and row.answer is not None and row.answer.text is not None
    assert row.request["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Row id-000017 says: {text}"},
    ]
    assert row.request["params"]["max_tokens"] == 30 and row.request["schema"] == SCHEMA
    assert row.request["structured_mode"] == "json_schema"
    # The answer shown is the one the job wrote for this row.
    answer = json.loads(row.answer.text)
    assert (answer["label"], answer["score"]) == (output["id-000017"]["label"], output["id-000017"]["score"])
    assert row.answer.output_tokens == output["id-000017"]["output_tokens"]
    assert SECRET not in json.dumps(asdict(row), default=str)

    shown = await run_cli("requests", ran.job_id, "--limit", "3", "--state-dir", str(state))
    assert shown.returncode == 0, shown.stderr
    heads = [line.split()[3] for line in shown.stdout.splitlines() if line.startswith("job ")]
    assert heads == ["id-000000", "id-000001", "id-000002"]
    assert "  user: Row id-000001 says:" in shown.stdout
    assert re.search(r"^  request key [0-9a-f]{64}$", shown.stdout, re.M)
    assert "structured output as json_schema" in shown.stdout
    assert SECRET not in shown.stdout + shown.stderr and "Authorization" not in shown.stdout

    store = engine.open_store(state)
    try:
        with pytest.raises(BackfillError, match="has no row with id 'no-such-row'; its row ids are column 'id'"):
            job_requests(store, ran.job_id, "no-such-row")
    finally:
        store.close()


async def test_a_job_read_from_a_frame_cannot_be_rerendered(tmp_path: Path) -> None:
    async with Simulator(SimConfig(latency_s=0.001)) as sim:
        await backfill.arun(
            make_rows(5).to_pandas(), prompt=PROMPT, model="gpt-4o-mini", provider="sim", base_url=sim.base_url,
            state_dir=tmp_path, progress=False,
        )
    store = Store(tmp_path / "backfill.db")
    try:
        (job,) = store.list_jobs()
        with pytest.raises(BackfillError) as e:
            job_requests(store, job.id)
    finally:
        store.close()
    assert str(e.value) == f"Job {job.id} read a frame from Python, which the ledger does not keep, so its requests cannot be re-rendered."
