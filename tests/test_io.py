"""Sources, sinks and typed output columns, on real files in tmp_path."""

from __future__ import annotations

import datetime as dt
import enum
import gzip
import json
import os
from pathlib import Path
from typing import Literal

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from backfill.errors import BackfillError, SpecError
from backfill.io import (
    Sink,
    arrow_type_for,
    check_id_column,
    check_writable,
    open_source,
    output_fields,
    output_table,
)
from backfill.io import sources as sources_module
from backfill.io.schema import JSON_TEXT_KEY


def _table(n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "text": [f"row number {i} says hello" for i in range(n)],
            "score": [i / 4 for i in range(n)],
        }
    )


def _write(path: Path, table: pa.Table) -> Path:
    fmt = path.suffix.lstrip(".")
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=10_000)
    elif fmt == "csv":
        pcsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    return path


def _collect(source, batch_size: int) -> tuple[pa.Table, list[int]]:
    batches = list(source.batches(batch_size))
    return pa.Table.from_batches(batches, schema=source.schema), [b.num_rows for b in batches]


# --- sources -----------------------------------------------------------------


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_file_sources_read_every_row_in_order(tmp_path: Path, ext: str) -> None:
    expected = _table(1000)
    source = open_source(_write(tmp_path / f"in.{ext}", expected))
    assert source.columns == ["id", "text", "score"]
    assert source.num_rows() == 1000
    table, sizes = _collect(source, 300)
    assert sizes == [300, 300, 300, 100]
    assert table.to_pylist() == expected.to_pylist()
    assert source.head(2) == expected.slice(0, 2).to_pylist()
    # A second pass (resume) reads the same rows again.
    assert _collect(source, 1000)[0].to_pylist() == expected.to_pylist()
    # Only the asked columns (the id check reads the ids alone), still in exact batches.
    only = list(source.batches(300, ["score", "id"]))
    assert [b.num_rows for b in only] == [300, 300, 300, 100]
    assert pa.Table.from_batches(only).to_pydict() == expected.select(["score", "id"]).to_pydict()


def test_in_memory_frames(tmp_path: Path) -> None:
    expected = _table(500)
    frames = [
        expected,
        expected.to_pandas(),
        pl.from_arrow(expected),
        pa.RecordBatchReader.from_batches(expected.schema, expected.to_batches(max_chunksize=77)),
    ]
    for frame in frames:
        source = open_source(frame)
        assert source.columns == ["id", "text", "score"]
        assert source.num_rows() == 500
        table, sizes = _collect(source, 200)
        assert sizes == [200, 200, 100]
        assert table.to_pylist() == expected.to_pylist()
        assert source.head(3) == expected.slice(0, 3).to_pylist()
    # The same data hashes the same whatever its batch layout; other data does not.
    fingerprint = open_source(expected).fingerprint()
    assert open_source(pa.Table.from_batches(expected.to_batches(max_chunksize=33))).fingerprint() == fingerprint
    reader = pa.RecordBatchReader.from_batches(expected.schema, expected.to_batches(max_chunksize=77))
    assert open_source(reader).fingerprint() == fingerprint
    assert open_source(expected).fingerprint() != open_source(_table(501)).fingerprint()
    changed = expected.set_column(1, "text", pa.array(["x"] * 500))
    assert open_source(changed).fingerprint() != open_source(expected).fingerprint()


def test_file_fingerprint_changes_with_content(tmp_path: Path) -> None:
    path = _write(tmp_path / "in.csv", _table(10))
    first = open_source(path).fingerprint()
    assert open_source(path).fingerprint() == first
    _write(path, _table(11))
    assert open_source(path).fingerprint() != first


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_batches_of_a_large_file_come_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str) -> None:
    monkeypatch.setattr(sources_module, "_TEXT_BLOCK", 1 << 16)
    source = open_source(_write(tmp_path / f"big.{ext}", _table(100_000)))
    assert source.num_rows() == 100_000
    sizes = []
    last_id = -1
    for batch in source.batches(4096):
        ids = batch.column(0).to_pylist()
        assert ids == list(range(last_id + 1, last_id + 1 + len(ids)))
        last_id = ids[-1]
        sizes.append(batch.num_rows)
    assert sizes == [4096] * 24 + [1696]


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_streaming_memory_does_not_grow_with_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str
) -> None:
    monkeypatch.setattr(sources_module, "_TEXT_BLOCK", 1 << 16)
    table = _table(300_000)
    source = open_source(_write(tmp_path / f"big.{ext}", table))
    source.num_rows()
    before = pa.total_allocated_bytes()
    peak = 0
    for _ in source.batches(4096):
        peak = max(peak, pa.total_allocated_bytes() - before)
    # The table is ~14 MB in Arrow; streaming holds a few blocks (a few MB, whatever the file size).
    assert peak < table.nbytes / 4


def test_csv_types_widen_instead_of_failing_late(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_module, "_TEXT_BLOCK", 1 << 12)
    lines = ["id,code,amount,day,note"]
    lines += [f'{i},{i},{i},2024-01-0{1 + i % 9},"line one\nline two"' for i in range(2000)]
    lines += ["2000,A17,2.5,not a date,last"]
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(lines) + "\n")
    source = open_source(path)
    assert source.num_rows() == 2001
    schema = source.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("code").type == pa.string()
    assert schema.field("amount").type == pa.float64()
    assert schema.field("day").type == pa.string()  # dates stay the text the user wrote
    rows = _collect(source, 500)[0].to_pylist()
    assert rows[0] == {"id": 0, "code": "0", "amount": 0.0, "day": "2024-01-01", "note": "line one\nline two"}
    assert rows[-1] == {"id": 2000, "code": "A17", "amount": 2.5, "day": "not a date", "note": "last"}


def test_tsv_and_compressed_inputs(tmp_path: Path) -> None:
    tsv = tmp_path / "in.tsv"
    tsv.write_text("a\tb\n1\tx, y\n")
    assert open_source(tsv).head(5) == [{"a": 1, "b": "x, y"}]
    gz = tmp_path / "in.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert _collect(open_source(gz), 10)[0].to_pylist() == [{"a": 1}, {"a": 2}]


def test_jsonl_fields_unified_across_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources_module, "_TEXT_BLOCK", 1 << 12)
    lines = [json.dumps({"id": i, "v": i, "when": "2024-01-01"}) for i in range(1000)]
    lines += ["", json.dumps({"id": 1000, "v": 0.5, "extra": {"k": [1, 2]}, "when": "soon"})]
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join(lines))  # no trailing newline, a blank line
    source = open_source(path)
    assert source.num_rows() == 1001
    assert source.schema.field("v").type == pa.float64()
    assert source.schema.field("when").type == pa.string()
    rows = _collect(source, 300)[0].to_pylist()
    assert rows[0] == {"id": 0, "v": 0.0, "when": "2024-01-01", "extra": None}
    assert rows[-1] == {"id": 1000, "v": 0.5, "when": "soon", "extra": {"k": [1, 2]}}


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": oops}\n')
    with pytest.raises(SpecError, match="JSON Lines: line 2 is not one JSON object"):
        open_source(bad).num_rows()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"a": 1}\n' * 10 + '{"a": "one"}\n')
    with pytest.raises(SpecError, match="field 'a' holds values of different types"):
        _ = open_source(mixed).schema


def test_source_errors_are_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        open_source(tmp_path / "nope.parquet")
    odd = tmp_path / "data.xlsx"
    odd.write_bytes(b"x")
    with pytest.raises(SpecError, match=r"use --input-format parquet\|csv\|jsonl"):
        open_source(odd)
    with pytest.raises(SpecError, match="Unknown input format"):
        open_source(odd, format="excel")
    fake = tmp_path / "fake.parquet"
    fake.write_text("id,text\n1,a\n")
    with pytest.raises(SpecError, match="Cannot read .* as Parquet"):
        open_source(fake)
    assert open_source(fake, format="csv").num_rows() == 1  # the override wins over the extension
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SpecError, match="is empty"):
        open_source(empty)
    with pytest.raises(SpecError, match="is a directory"):
        open_source(tmp_path)
    with pytest.raises(SpecError, match="Cannot read input of type"):
        open_source(42)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl", "memory"])
def test_check_id_column(tmp_path: Path, kind: str) -> None:
    def source(table: pa.Table, name: str):
        return table if kind == "memory" else open_source(_write(tmp_path / f"{name}.{kind}", table))

    good = _table(5000)
    check_id_column(open_source(source(good, "good")), "id")
    with pytest.raises(SpecError, match="'nope' is not in the input"):
        check_id_column(open_source(source(good, "good")), "nope")
    dup = good.set_column(0, "id", pa.array([i % 4999 for i in range(5000)], pa.int64()))
    with pytest.raises(SpecError, match=r"1 duplicated value\(s\) \(e.g. 0\)"):
        check_id_column(open_source(source(dup, "dup")), "id")
    nulls = good.set_column(0, "id", pa.array([None if i == 7 else i for i in range(5000)], pa.int64()))
    with pytest.raises(SpecError, match="1 empty value"):
        check_id_column(open_source(source(nulls, "nulls")), "id")


@pytest.mark.parametrize(
    "ids, dupes",
    [
        (["a", "b", "ä", "a", "A"], 1),  # text ids pass as JSON
        ([2**64 - 1, 2**64 - 2, 2**63], 0),  # uint64 beyond int64: as exact text, never rounded together
        ([dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 1)], 1),
    ],
)
def test_check_id_column_types(ids: list[object], dupes: int) -> None:
    arrow_type = pa.uint64() if isinstance(ids[0], int) else None
    table = pa.table({"id": pa.array(ids, arrow_type), "text": [str(i) for i in range(len(ids))]})
    if dupes:
        with pytest.raises(SpecError, match=rf"{dupes} duplicated value"):
            check_id_column(open_source(table), "id")
    else:
        check_id_column(open_source(table), "id")
    nested = pa.table({"id": [[1], [2]], "text": ["a", "b"]})
    with pytest.raises(SpecError, match="cannot serve as a row id"):
        check_id_column(open_source(nested), "id")


# --- sinks -------------------------------------------------------------------

SCHEMA = pa.schema([("row_id", pa.int64()), ("answer", pa.string()), ("vec", pa.list_(pa.float32()))])


def _chunk(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "vec": [[float(i), 0.5] for i in range(start, start + n)],  # out of schema order on purpose
            "row_id": list(range(start, start + n)),
            "answer": [f"a{i}" for i in range(start, start + n)],
        }
    )


def _read_output(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "csv":
        return [
            {"row_id": int(r["row_id"]), "answer": r["answer"], "vec": json.loads(r["vec"])}
            for r in pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
        ]
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_sink_assembles_parts_in_order(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"out.{fmt}"
    sink = Sink(out, format=None, parts_dir=tmp_path / "parts", schema=SCHEMA)
    for i in (2, 0, 1):  # chunks finish out of order
        sink.write_chunk(i, _chunk(i * 10, 10))
    sink.write_chunk(1, _chunk(10, 10))  # a re-written chunk replaces its part
    assert sink.finalize(3) == out
    rows = _read_output(out, fmt)
    assert [r["row_id"] for r in rows] == list(range(30))
    assert rows[13] == {"row_id": 13, "answer": "a13", "vec": [13.0, 0.5]}
    assert not list((tmp_path / "parts").glob("part-*"))
    assert sink.finalize(3) == out  # calling again is harmless
    assert _read_output(out, fmt) == rows
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_empty_input_gives_valid_empty_output(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out.data"
    Sink(out, format=fmt, parts_dir=tmp_path / "parts", schema=SCHEMA).finalize(0)
    if fmt == "parquet":
        table = pq.read_table(out)
        assert table.num_rows == 0 and table.schema.equals(SCHEMA)
    elif fmt == "csv":
        assert out.read_text().strip() == '"row_id","answer","vec"'
    else:
        assert out.read_text() == ""


def test_part_is_never_half_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = tmp_path / "parts"
    sink = Sink(tmp_path / "out.parquet", format=None, parts_dir=parts, schema=SCHEMA)
    sink.write_chunk(0, _chunk(0, 5))
    seen_while_writing: list[str] = []
    real_write = pq.write_table

    def crashing_write(table: pa.Table, where, **kwargs) -> None:
        real_write(table.slice(0, 1), where, **kwargs)  # some bytes are on disk...
        seen_while_writing.extend(sorted(p.name for p in parts.glob("part-*")))
        raise OSError("disk full")  # ...and then the process fails

    monkeypatch.setattr(pq, "write_table", crashing_write)
    with pytest.raises(OSError):
        sink.write_chunk(0, _chunk(100, 5))
    with pytest.raises(OSError):
        sink.write_chunk(1, _chunk(5, 5))
    monkeypatch.undo()
    # While bytes were being written, no new part-* name existed; afterwards only the old, whole part.
    assert seen_while_writing == ["part-000000000.parquet", "part-000000000.parquet"]
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000000.parquet"]
    assert pq.read_table(parts / "part-000000000.parquet").column("row_id").to_pylist() == list(range(5))
    with pytest.raises(BackfillError, match=r"1 chunk part\(s\) are missing \(first: chunk 1\)"):
        sink.finalize(2)
    assert not (tmp_path / "out.parquet").exists()


def test_failed_finalize_leaves_no_output_and_keeps_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.jsonl"
    sink = Sink(out, format=None, parts_dir=tmp_path / "parts", schema=SCHEMA)
    for i in range(3):
        sink.write_chunk(i, _chunk(i * 4, 4))
    monkeypatch.setattr(Sink, "_write_jsonl", lambda self, f, batches: (f.write(b"{partial"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        sink.finalize(3)
    monkeypatch.undo()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]
    sink.finalize(3)  # the retry builds it from the parts that are still there
    assert [r["row_id"] for r in _read_output(out, "jsonl")] == list(range(12))


def test_write_chunk_rejects_wrong_columns(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "o.parquet", format=None, parts_dir=tmp_path / "parts", schema=SCHEMA)
    with pytest.raises(BackfillError, match="Chunk 3 does not match the output schema"):
        sink.write_chunk(3, pa.table({"row_id": [1]}))


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "out.parquet", None)
    check_writable(tmp_path / "out", None)  # no extension: Parquet
    check_writable(tmp_path / "out.txt", "csv")
    with pytest.raises(SpecError, match="Cannot tell the output format"):
        check_writable(tmp_path / "out.txt", None)
    with pytest.raises(SpecError, match="Unknown output format 'xml'"):
        check_writable(tmp_path / "out.parquet", "xml")
    with pytest.raises(SpecError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.parquet", None)
    with pytest.raises(SpecError, match="is a directory"):
        check_writable(tmp_path, None)
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SpecError, match="not writable"):
            check_writable(locked / "out.csv", None)


# --- typed output columns ----------------------------------------------------


class Mood(enum.StrEnum):
    happy = "happy"
    sad = "sad"


class Address(BaseModel):
    city: str
    zip: str | None = None


class Answer(BaseModel):
    label: Literal["spam", "ham"]
    mood: Mood
    score: float
    count: int
    ok: bool
    tags: list[str]
    address: Address
    maybe: int | None = None
    extras: dict[str, int]
    either: int | str
    people: list[Address]


def test_arrow_types_from_pydantic_schema() -> None:
    schema = Answer.model_json_schema()
    fields = {f.name: f for f in output_fields(schema)}
    assert list(fields) == list(Answer.model_fields)
    assert fields["label"].type == pa.string()
    assert fields["mood"].type == pa.string()
    assert fields["score"].type == pa.float64()
    assert fields["count"].type == pa.int64()
    assert fields["ok"].type == pa.bool_()
    assert fields["tags"].type == pa.list_(pa.string())
    assert fields["address"].type == pa.struct([("city", pa.string()), ("zip", pa.string())])
    assert fields["maybe"].type == pa.int64() and fields["maybe"].nullable
    assert fields["people"].type == pa.list_(fields["address"].type)
    for name in ("extras", "either"):
        assert fields[name].type == pa.string()
        assert fields[name].metadata == {JSON_TEXT_KEY: b"1"}
    assert arrow_type_for({"type": ["number", "null"]}) == pa.float64()
    assert arrow_type_for({"type": "array", "items": {"type": "integer"}}) == pa.list_(pa.int64())
    assert arrow_type_for({"enum": [1, 2]}) == pa.int64()
    assert arrow_type_for({"enum": ["a", 1]}) == pa.string()
    with pytest.raises(SpecError, match="must be a JSON object"):
        output_fields({"type": "string"})


def test_recursive_refs_become_json_text() -> None:
    schema = {
        "type": "object",
        "properties": {"tree": {"$ref": "#/$defs/Node"}},
        "$defs": {
            "Node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}
        },
    }
    (tree,) = output_fields(schema)
    kids = tree.type.field("kids")
    assert kids.type.value_field.metadata == {JSON_TEXT_KEY: b"1"}


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_typed_answers_round_trip(tmp_path: Path, fmt: str) -> None:
    fields = output_fields(Answer.model_json_schema())
    answers = [
        Answer(
            label="spam" if i % 2 else "ham",
            mood=Mood.happy,
            score=i + 0.5,
            count=i,
            ok=bool(i % 2),
            tags=[f"t{i}", "x"],
            address=Address(city=f"c{i}"),
            maybe=None if i % 3 else i,
            extras={"k": i},
            either=i if i % 2 else f"s{i}",
            people=[Address(city="p", zip="0123")],
        ).model_dump(mode="json")
        for i in range(6)
    ]
    answers[1]["count"] = 1.0  # a JSON number an LLM wrote as 1.0 is still an integer
    table = output_table(answers, fields)
    schema = pa.schema(fields)
    out = tmp_path / f"answers.{fmt}"
    sink = Sink(out, format=None, parts_dir=tmp_path / "parts", schema=schema)
    sink.write_chunk(0, table.slice(0, 3))
    sink.write_chunk(1, table.slice(3))
    sink.finalize(2)
    if fmt == "parquet":
        back = pq.read_table(out)
        assert back.schema.equals(schema)
        rows = back.to_pylist()
        for row in rows:
            row["extras"], row["either"] = json.loads(row["extras"]), json.loads(row["either"])
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        frame = pd.read_csv(out, dtype=str, keep_default_na=False)
        rows = []
        for r in frame.to_dict("records"):
            rows.append(
                {
                    **{k: json.loads(r[k]) for k in ("tags", "address", "extras", "either", "people")},
                    "label": r["label"],
                    "mood": r["mood"],
                    "score": float(r["score"]),
                    "count": int(r["count"]),
                    "ok": r["ok"] == "true",
                    "maybe": int(r["maybe"]) if r["maybe"] else None,
                }
            )
    expected = [{**a, "count": int(a["count"])} for a in answers]
    assert rows == expected
    with pytest.raises(pa.ArrowInvalid):
        output_table([{**answers[0], "count": 2.5}], fields)


# --- text encodings -------------------------------------------------------------


def _latin1_file(path: Path, bad_row: int, n: int = 20_000) -> Path:
    """`n` rows of id and text, all ASCII except one latin-1 'é' in row `bad_row` (0-based)."""
    if path.suffix == ".csv":
        lines = ["id,text"] + [f"{i},row {i}" for i in range(n)]
        lines[bad_row + 1] = f"{bad_row},caf\xe9"  # +1: the header
    else:
        lines = [json.dumps({"id": i, "text": f"row {i}"}) for i in range(n)]
        lines[bad_row] = json.dumps({"id": bad_row, "text": "caf\xe9"}, ensure_ascii=False)
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize("block", [None, 1 << 16], ids=["one-block", "later-block"])
@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_text_that_is_not_utf8_is_refused_naming_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str, block: int | None
) -> None:
    # One block: pyarrow infers the CSV column as binary; a later block: it fails to convert it.
    if block is not None:
        monkeypatch.setattr(sources_module, "_TEXT_BLOCK", block)
    path = _latin1_file(tmp_path / f"in.{ext}", bad_row=15_000)
    line = 15_002 if ext == "csv" else 15_001
    with pytest.raises(SpecError) as e:
        source = open_source(path)
        _ = source.schema
    assert str(e.value) == (
        f"Input file '{path}' is not valid UTF-8 at line {line} (byte 0xe9); "
        "pass --input-encoding latin-1 (or the file's encoding)."
    )


@pytest.mark.parametrize("ext", ["csv", "jsonl", "csv.gz"])
def test_input_encoding_decodes_the_text(tmp_path: Path, ext: str) -> None:
    path = _latin1_file(tmp_path / f"in.{ext.removesuffix('.gz')}", bad_row=2, n=5)
    if ext.endswith(".gz"):
        gz = tmp_path / f"in.{ext}"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path = gz
    source = open_source(path, encoding="latin-1")
    assert source.schema.field("text").type == pa.string()
    assert [r["text"] for r in _collect(source, 2)[0].to_pylist()] == ["row 0", "row 1", "café", "row 3", "row 4"]
    # The same bytes read another way are other rows: another fingerprint, so another job.
    assert source.fingerprint() != open_source(path, encoding="cp1252").fingerprint()
    utf8 = _write(tmp_path / "utf8.csv", _table(3))
    assert open_source(utf8, encoding="UTF8").fingerprint() == open_source(utf8).fingerprint()


def test_input_encoding_errors(tmp_path: Path) -> None:
    csv_path = _write(tmp_path / "in.csv", _table(3))
    with pytest.raises(SpecError, match="Unknown input encoding 'klingon'"):
        open_source(csv_path, encoding="klingon")
    with pytest.raises(SpecError, match="applies to CSV and JSONL files"):
        open_source(_write(tmp_path / "in.parquet", _table(3)), encoding="latin-1")
    with pytest.raises(SpecError, match="applies to CSV and JSONL files"):
        open_source(_table(3), encoding="latin-1")
    latin = _latin1_file(tmp_path / "latin.jsonl", bad_row=1, n=3)
    with pytest.raises(SpecError, match=r"cannot be decoded as ascii .*; pass the file's encoding with --input-encoding"):
        _ = open_source(latin, encoding="ascii").schema


def test_csv_header_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"id,t\xe9xt\n1,cafe\n")
    with pytest.raises(SpecError, match=r"not valid UTF-8 at line 1 \(byte 0xe9\)"):
        open_source(bad)
