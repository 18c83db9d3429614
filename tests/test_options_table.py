"""The one table of options: flags, job file keys and Python keywords agree; every option has help and a default; durations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from backfill.cli import app
from backfill.durations import parse_duration
from backfill.engine import make_plan
from backfill.errors import SpecError
from backfill.options import OPTIONS, SPEC_KEYWORDS, Kind, Scope
from backfill.spec import from_options
from conftest import make_rows

PROMPT = "Row {{ id }} says: {{ text }}"


def _walk(command: Any, path: str = "backfill") -> list[tuple[str, Any]]:
    found = [(path, command)]
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            found += _walk(sub, f"{path} {name}")
    return found


def test_every_option_of_every_command_has_help_and_a_shown_default() -> None:
    root = typer.main.get_command(app)
    missing: list[str] = []
    commands = _walk(root)
    assert {"backfill run", "backfill estimate", "backfill serve", "backfill sim", "backfill users", "backfill models", "backfill cache clear"} <= {p for p, _ in commands}
    for path, command in commands:
        for param in command.params:
            # Typer vendors its own click: an option is known by its kind, not its class.
            if param.param_type_name != "option" or param.hidden or param.name in ("help", "install_completion", "show_completion"):
                continue
            name = f"{path} {param.opts[0]}"
            if not (param.help or "").strip():
                missing.append(f"{name}: no help")
            # A flag's default is off; every other option shows what happens when it is not given.
            shown = isinstance(param.show_default, str) or (param.show_default is not False and param.default not in (None, ()))
            if not param.is_flag and not param.required and not shown:
                missing.append(f"{name}: no shown default")
    assert not missing, "\n".join(missing)


def test_version_debug_and_completion_are_listed() -> None:
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("backfill ")
    helped = runner.invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert "--debug" in helped.stdout and "--install-completion" in helped.stdout
    run_help = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert "Example: backfill run" in run_help.stdout and "[default: 60s]" in run_help.stdout.replace("(", "").replace(")", "")


def test_table_marks_spec_options_and_run_settings() -> None:
    run_settings = {o.name for o in OPTIONS if o.scope is Scope.RUN}
    assert {"state_dir", "quiet", "no_cache", "wait", "as_json", "log_every", "log_format", "force"} <= run_settings
    assert not run_settings & SPEC_KEYWORDS
    assert {"temperature", "max_tokens", "top_p", "seed", "stop", "price_input", "price_output", "params", "messages"} <= SPEC_KEYWORDS
    for o in OPTIONS:
        assert o.help and o.default, o.name
        assert (o.path is None) == (o.scope is Scope.RUN or o.name == "job_file"), o.name


def test_request_parameters_are_keywords_flags_and_job_file_keys_alike(tmp_path: Path) -> None:
    src = tmp_path / "rows.parquet"
    pq.write_table(make_rows(5), src)
    by_keyword = from_options(
        input=str(src), prompt=PROMPT, model="gpt-4o-mini", temperature=0.25, max_tokens=12, top_p=0.5, seed=7,
        stop=["END", "STOP"], price_input=1.0, price_output=3.0,
    )
    assert by_keyword.task.params == {"temperature": 0.25, "max_tokens": 12, "top_p": 0.5, "seed": 7, "stop": ["END", "STOP"]}
    assert by_keyword.prices["gpt-4o-mini"].input == 1.0 and by_keyword.prices["gpt-4o-mini"].output == 3.0
    job = tmp_path / "job.toml"
    job.write_text(
        f'[input]\npath = "{src}"\n[task]\nmodel = "gpt-4o-mini"\nprompt = "{PROMPT}"\n'
        '[task.params]\ntemperature = 0.25\nmax_tokens = 12\ntop_p = 0.5\nseed = 7\nstop = ["END", "STOP"]\n'
        '[prices."gpt-4o-mini"]\ninput = 1.0\noutput = 3.0\n'
    )
    by_file = from_options(job_file=job)
    assert by_file.task.params == by_keyword.task.params and by_file.prices == by_keyword.prices
    expected = make_plan(by_keyword).job_id
    assert make_plan(by_file).job_id == expected
    flags = [
        "estimate", "-i", str(src), "-p", PROMPT, "-m", "gpt-4o-mini", "--temperature", "0.25", "--max-tokens", "12",
        "--top-p", "0.5", "--seed", "7", "--stop", "END", "--stop", "STOP", "--price-input", "1", "--price-output", "3",
        "--state-dir", str(tmp_path / "state"), "--json",
    ]
    result = CliRunner().invoke(app, flags)
    assert result.exit_code == 0, result.output
    est = json.loads(result.stdout)
    assert est["job_id"] == expected and est["rows"] == 5
    # USD per 1M tokens, the flags' price: input 1.0 and output 3.0
    assert est["cost_usd"] == pytest.approx((est["input_tokens"] * 1.0 + est["expected_output_tokens"] * 3.0) / 1e6)


def test_an_unknown_keyword_names_the_valid_ones_with_a_did_you_mean() -> None:
    with pytest.raises(SpecError, match=r"Unknown option 'temprature'; did you mean 'temperature'\? valid options: .*max_tokens"):
        from_options(prompt=PROMPT, model="gpt-4o-mini", temprature=0.2)


def test_input_and_output_dash_are_not_made_absolute() -> None:
    spec = from_options(input="-", input_format="jsonl", output="-", prompt=PROMPT, model="gpt-4o-mini")
    assert spec.input.path == "-" and spec.output.path == "-"


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("10m", 600), ("6h", 21600), ("7d", 604800), ("45", 45), ("1.5", 1.5), (2, 2.0)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5s", "1e400", "10 parsecs", ""])
def test_bad_durations_are_one_sentence(text: str) -> None:
    with pytest.raises(SpecError, match="duration"):
        parse_duration(text)


def test_duration_flags_take_units(tmp_path: Path) -> None:
    spec = from_options(prompt=PROMPT, model="gpt-4o-mini", timeout_s="500ms")
    assert spec.task.timeout_s == 0.5
    cleared = CliRunner().invoke(app, ["cache", "clear", "--older-than", "500ms", "--state-dir", str(tmp_path)])
    assert cleared.exit_code == 0, cleared.output
    listed = {o.name for o in OPTIONS if o.kind is Kind.DURATION}
    assert listed == {"timeout_s", "log_every"}


def test_models_lists_prices_and_context_sizes() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "--json"])
    assert listed.exit_code == 0, listed.output
    models = {m["model"]: m for m in json.loads(listed.stdout)["models"]}
    assert models["gpt-4o"]["input"] == 2.5 and models["gpt-4o"]["output"] == 10.0 and models["gpt-4o"]["context_tokens"] == 128_000
    text = runner.invoke(app, ["models"], env={"COLUMNS": "120"})
    assert "gpt-4o-mini" in text.stdout and "128,000" in text.stdout
