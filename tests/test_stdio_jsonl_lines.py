"""Errors that name a place in a JSON Lines file give its real 1-based line number (issue 12, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backfill.errors import SpecError
from backfill.io import open_source, sources

ROWS = 600


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows() -> list[str]:
    return [json.dumps({"id": i, "n": i, "text": f"row {i}"}) for i in range(ROWS)]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ('{"id": 499, "n": 499, "text": ', "line 500 is not one JSON object"),  # cut short: pyarrow reads on into line 501
        ("not json at all", "line 500 is not one JSON object"),
        ("[499, 499]", "line 500 is not one JSON object (a JSON array"),
        ('{"id": 499, "n": "four hundred", "text": "x"}', "the first string at line 500"),
    ],
)
def test_a_bad_line_500_is_named_as_line_500(tmp_path: Path, bad: str, expected: str) -> None:
    lines = _rows()
    lines[499] = bad
    path = _write(tmp_path / "rows.jsonl", lines)
    with pytest.raises(SpecError) as e:
        open_source(path).num_rows()
    assert expected in str(e.value)


def test_blank_lines_do_not_shift_the_line_number(tmp_path: Path) -> None:
    lines = _rows()
    lines[10] = lines[20] = "   "  # pyarrow skips blank lines when it counts rows
    lines[499] = '{"id": 499, "n": "four hundred", "text": "x"}'
    with pytest.raises(SpecError, match=r"\(number and string, the first string at line 500\)"):
        open_source(_write(tmp_path / "rows.jsonl", lines)).num_rows()


def test_a_type_change_in_a_later_block_names_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [json.dumps({"id": i, "n": i}) for i in range(499)]
    lines += [json.dumps({"id": i}) for i in range(499, 540)]  # no value: fits any type
    # Blocks of exactly the first 540 lines: line 541 starts a block that holds text where the first held numbers.
    monkeypatch.setattr(sources, "_TEXT_BLOCK", sum(len(line) + 1 for line in lines))
    lines += [json.dumps({"id": i, "n": f"text {i}"}) for i in range(540, ROWS)]
    with pytest.raises(SpecError, match=r"field 'n' holds values of different types \(int64 and string, the first string at line 541\)"):
        _ = open_source(_write(tmp_path / "rows.jsonl", lines)).schema
