"""A real notebook run by nbclient on an ipykernel: the progress output ends at 100% with the job's summary."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

CELL = """
import backfill, pandas as pd
rows = pd.DataFrame({{"id": [f"{{i:03d}}" for i in range(40)], "text": [f"row {{i}}" for i in range(40)]}})
out = backfill.run(rows, prompt="Say {{{{ text }}}}", model="gpt-4o-mini", provider="sim", id_column="id",
                   params={{"max_tokens": 20}}, chunk_size=10, state_dir={state_dir!r}, output={output!r})
summary = backfill.last_job()
print(len(out), out["id"].iloc[7], summary.rows_ok, summary.output)
"""


def test_a_notebook_shows_progress_to_the_end_and_the_summary(tmp_path: Path) -> None:
    output = str(tmp_path / "out.parquet")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELL.format(state_dir=str(tmp_path), output=output))])
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert len(shown) == 1, outputs  # one display, updated in place, not a frame per refresh
    html, text = shown[0].data["text/html"], shown[0].data["text/plain"]
    assert 'value="40" max="40"' in html and "100%" in html
    assert "40/40 rows (100%)" in text
    assert "rows ok 40, dead letters 0 of 40" in text and f"output: {output}" in text  # the summary closes it
    assert not any("ipywidgets" in str(o) for o in outputs)
    printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert printed.split() == ["40", "007", "40", output]
