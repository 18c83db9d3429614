"""backfill.run from Python: types survive CSV and JSONL outputs, last_job() is the run's summary, Ctrl-C pauses the job."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import backfill
from backfill.sim import SimConfig, Simulator
from backfill.store import Store
from conftest import make_rows

PROMPT = "Row {{ id }} says: {{ text }}"


def frame(n: int) -> pd.DataFrame:
    ids = [f"{i:03d}" for i in range(n)]  # "007": a string that a CSV reader would turn into 7
    return pd.DataFrame({"id": ids, "text": make_rows(n).column("text").to_pylist(), "n": list(range(n))})


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_the_returned_frame_keeps_the_output_types(tmp_path: Path, suffix: str) -> None:
    out = backfill.run(
        frame(30), prompt=PROMPT, model="gpt-4o-mini", provider="sim", id_column="id", columns=["text", "n"],
        params={"max_tokens": 20}, output=str(tmp_path / f"o.{suffix}"), state_dir=tmp_path, progress=False,
    )
    assert out["id"].tolist() == [f"{i:03d}" for i in range(30)]
    assert out["n"].tolist() == list(range(30)) and str(out["n"].dtype) == "int64"
    assert set(out["status"]) == {"ok"} and out["error"].isna().all()
    summary = backfill.last_job()
    assert summary is not None and summary.rows_ok == 30 and summary.rows_failed == 0
    assert summary.output == str(tmp_path / f"o.{suffix}") and summary.requests == 30 and summary.cost_usd > 0


def test_an_unknown_return_type_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(backfill.SpecError, match="return_type"):
        backfill.run(frame(3), prompt=PROMPT, model="gpt-4o-mini", provider="sim", return_type="dask", state_dir=tmp_path, progress=False)
    with pytest.raises(backfill.SpecError, match="standard output"):
        backfill.run(frame(3), prompt=PROMPT, model="gpt-4o-mini", provider="sim", output="-", state_dir=tmp_path, progress=False)


SCRIPT = """
import asyncio, sys
import pandas as pd
import backfill

rows = pd.DataFrame({{"id": [str(i) for i in range(400)], "text": [f"hello {{i}}" for i in range(400)]}})

def go():
    backfill.run(rows, prompt="{{{{ text }}}}", model="gpt-4o-mini", provider="sim", base_url={base_url!r}, id_column="id",
                 params={{"max_tokens": 20}}, max_in_flight=4, chunk_size=10, state_dir={state_dir!r}, progress=False)

async def in_a_loop():  # as in a notebook: run() is called while an event loop runs
    go()

# Like ipykernel's, this loop leaves Ctrl-C to Python's default handler (asyncio.run would swallow the first).
asyncio.new_event_loop().run_until_complete(in_a_loop()) if {in_loop} else go()
"""


@pytest.mark.parametrize("in_loop", [False, True], ids=["script", "inside-a-loop"])
async def test_ctrl_c_pauses_the_job_in_one_line(tmp_path: Path, in_loop: bool) -> None:
    async with Simulator(SimConfig(latency_s=0.2)) as sim:
        script = tmp_path / "job.py"
        script.write_text(textwrap.dedent(SCRIPT.format(base_url=sim.base_url, state_dir=str(tmp_path), in_loop=in_loop)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "200"}
        )
        while not sim.log.entries:  # wait until the job is sending
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode != 0, text
    store = Store(tmp_path / "backfill.db")
    try:
        (job,) = store.list_jobs()
    finally:
        store.close()
    assert job.status is backfill.status.JobStatus.PAUSED and job.rows_done < 400, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("backfill.errors.Interrupted: ") and f"backfill resume {job.id}" in last and "run again" in last
    # The user's own frames and the message; of backfill's, only the `run` they called, none of the event loop's.
    ours = [line for line in text.splitlines() if line.strip().startswith('File "') and "/backfill/" in line]
    assert len(ours) <= 1, text
