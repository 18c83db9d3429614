"""Outputs that cannot destroy data: never the input, never someone else's file unless asked,
the format its extension says, and a directory proven writable before any request."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from backfill.engine import make_plan
from backfill.errors import SpecError
from backfill.io import check_writable
from backfill.sim import SimConfig, Simulator
from backfill.spec import JobSpec, from_options
from backfill.store import Store
from conftest import make_rows, run_cli

PROMPT = "Row {{ id }} says: {{ text }}"


def _csv(path: Path, n: int = 5) -> Path:
    lines = ["id,text"] + [f"id-{i},row {i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec(src: Path, out: Path, **options: object) -> JobSpec:
    return from_options(input=str(src), id_column="id", prompt=PROMPT, model="gpt-4o-mini", output=str(out), **options)


def test_output_that_is_the_input_is_refused(tmp_path: Path) -> None:
    src = _csv(tmp_path / "rows.csv")
    before = src.read_bytes()
    (tmp_path / "link.csv").symlink_to(src)
    os.link(src, tmp_path / "hard.csv")
    (tmp_path / "sub").mkdir()
    for out in (src, tmp_path / "link.csv", tmp_path / "hard.csv", tmp_path / "sub" / ".." / "rows.csv"):
        for if_exists in ("fail", "replace"):
            with pytest.raises(SpecError, match=r"^The output .* is the input file; write the output to another file\.$"):
                make_plan(_spec(src, out, if_exists=if_exists))
    assert src.read_bytes() == before


def test_existing_output_is_refused_unless_replace(tmp_path: Path) -> None:
    src = _csv(tmp_path / "rows.csv")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"someone's results")
    with pytest.raises(SpecError) as e:
        make_plan(_spec(src, out))
    assert str(e.value) == (
        f"The output file '{out}' already exists; pass --if-exists replace to overwrite it, or choose another path."
    )
    assert make_plan(_spec(src, out, if_exists="replace")).rows_total == 5
    assert out.read_bytes() == b"someone's results"  # planning never touches it
    with pytest.raises(SpecError, match=r"^Job spec field 'output.if_exists'"):
        _spec(src, out, if_exists="overwrite")


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_append_and_upsert_are_for_tables_not_files(tmp_path: Path, mode: str) -> None:
    src = _csv(tmp_path / "rows.csv")
    with pytest.raises(SpecError, match=rf"^--if-exists {mode} applies to table outputs \(SQL\), not files; "):
        make_plan(_spec(src, tmp_path / "new.parquet", if_exists=mode))


def test_extension_and_format_must_agree(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        check_writable(tmp_path / "x.csv", "parquet")
    assert str(e.value) == (
        f"The output file '{tmp_path / 'x.csv'}' ends in .csv but the output format is parquet;"
        " make them agree (e.g. name it x.parquet)."
    )
    with pytest.raises(SpecError, match="ends in .jsonl but the output format is csv"):
        check_writable(tmp_path / "x.jsonl", "csv")
    check_writable(tmp_path / "X.CSV", "csv")
    check_writable(tmp_path / "x.ndjson", "jsonl")
    check_writable(tmp_path / "x.out", "parquet")  # no known extension: the format given decides


def test_output_directory_is_proven_writable_by_a_probe(tmp_path: Path) -> None:
    # /proc passes os.access for root, yet nothing can be created in it.
    with pytest.raises(SpecError, match=r"^The output directory '/proc' is not writable \(.*\); "):
        check_writable("/proc/o.parquet", None)
    check_writable(tmp_path / "o.parquet", None)
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_existing_output_of_this_job_is_its_own(tmp_path: Path) -> None:
    src = _csv(tmp_path / "rows.csv")
    out = tmp_path / "out.parquet"
    spec = _spec(src, out)
    store = Store(tmp_path / "state" / "backfill.db")
    try:
        plan = make_plan(spec, store=store)
        out.write_bytes(b"this job's finished output")
        with pytest.raises(SpecError, match="already exists"):
            make_plan(spec, store=store)  # the store has never heard of the job
        record = spec.model_dump(by_alias=True)
        store.upsert_job(plan.job_id, owner="local", spec=record, input_fingerprint=plan.input_fingerprint)
        assert make_plan(spec, store=store).job_id == plan.job_id  # re-running it, or resuming it
        with pytest.raises(SpecError, match="already exists"):
            make_plan(_spec(src, out, chunk_size=7), store=store)  # another job wants the same file
        record["output"]["path"] = str(tmp_path / "elsewhere.parquet")
        store.upsert_job(plan.job_id, owner="local", spec=record, input_fingerprint=plan.input_fingerprint)
        with pytest.raises(SpecError, match="already exists"):
            make_plan(spec, store=store)  # the ledger's job wrote elsewhere: this file is not its own
    finally:
        store.close()


def _latin1_csv(path: Path, n: int) -> Path:
    lines = ["id,text"] + [f"id-{i},row {i}" for i in range(n)]
    lines[n] = f"id-{n - 1},caf\xe9 au lait"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


async def test_cli_refuses_with_one_sentence_and_sends_nothing(tmp_path: Path) -> None:
    src = tmp_path / "rows.parquet"
    pq.write_table(make_rows(20), src)
    taken = tmp_path / "taken.parquet"
    taken.write_bytes(b"keep me")
    latin = _latin1_csv(tmp_path / "latin.csv", 20)
    async with Simulator(SimConfig(latency_s=0.0)) as sim:
        def args(input: Path, out: Path, *extra: str) -> list[str]:
            return [
                "run", "--input", str(input), "--id-column", "id", "--prompt", PROMPT, "--model", "gpt-4o-mini",
                "--provider", "sim", "--base-url", sim.base_url, "--output", str(out),
                "--state-dir", str(tmp_path / "state"), "--quiet", *extra,
            ]

        cases = {
            "exists": (args(src, taken), "already exists; pass --if-exists replace"),
            "is input": (args(src, src, "--if-exists", "replace"), "is the input file"),
            "format": (args(src, tmp_path / "x.csv", "--output-format", "parquet"), "ends in .csv but the output format is parquet"),
            "append": (args(src, tmp_path / "y.parquet", "--if-exists", "append"), "applies to table outputs (SQL), not files"),
            "utf-8": (args(latin, tmp_path / "z.parquet"), "is not valid UTF-8 at line 21 (byte 0xe9); pass --input-encoding"),
        }
        results = await asyncio.gather(*(run_cli(*a) for a, _ in cases.values()))
        for (name, (_, expected)), result in zip(cases.items(), results, strict=True):
            message = " ".join(result.stderr.split())
            assert result.returncode == 2, (name, result.stderr)
            assert message.startswith("error: ") and expected in message, (name, message)
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2, name
        assert len(sim.log) == 0
    assert taken.read_bytes() == b"keep me"
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "z.parquet").exists()


async def test_cli_input_encoding_and_replace(tmp_path: Path) -> None:
    latin = _latin1_csv(tmp_path / "latin.csv", 6)
    out = tmp_path / "out.jsonl"
    out.write_text("an old result\n")
    result = await run_cli(
        "run", "--input", str(latin), "--id-column", "id", "--prompt", "{{ text }}", "--model", "gpt-4o-mini",
        "--output", str(out), "--if-exists", "replace", "--input-encoding", "latin-1",
        "--state-dir", str(tmp_path / "state"), "--quiet",
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "an old result" not in text
    assert "café au lait" in text and "caf\\u00e9" not in text and "b'" not in text
