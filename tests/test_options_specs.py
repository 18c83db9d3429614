"""Specs the engine must never run: reserved request keys in task.params, NaN/Infinity, huge timeouts, $ref cycles, deep schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from backfill.cli import app
from backfill.errors import SpecError
from backfill.spec import RESERVED_PARAMS, build_spec, from_options

PROMPT = "Say {{ text }}"


def _deep_schema(depth: int) -> dict[str, Any]:
    inner: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        inner = {"type": "object", "properties": {"a": inner}}
    return inner


CYCLE = {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}}


@pytest.mark.parametrize("key", sorted(RESERVED_PARAMS))
def test_reserved_request_keys_are_refused_in_python_naming_what_to_use(key: str) -> None:
    with pytest.raises(SpecError) as caught:
        from_options(prompt=PROMPT, model="gpt-4o-mini", params={key: "x"})
    message = str(caught.value)
    assert f"'{key}'" in message and "instead" in message and message.count(". ") <= 1


def test_reserved_request_keys_are_refused_in_a_job_file_on_the_cli(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'[task]\nmodel = "gpt-4o-mini"\nprompt = "{PROMPT}"\n[task.params]\nmodel = "o1-pro"\nn = 50\n')
    result = CliRunner().invoke(app, ["estimate", str(job), "--state-dir", str(tmp_path)])
    assert isinstance(result.exception, SpecError) and "'model'" in str(result.exception) and "task.model" in str(result.exception)


def test_recursive_and_shared_refs_are_still_accepted() -> None:
    tree = {"type": "object", "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#"}}}}
    assert from_options(prompt=PROMPT, model="gpt-4o-mini", schema=tree).task.schema_ == tree
    defs = {"b": {"$ref": "#/$defs/d"}, "c": {"$ref": "#/$defs/d"}, "d": {"type": "string"}}
    diamond = {"type": "object", "properties": {"a": {"allOf": [{"$ref": "#/$defs/b"}, {"$ref": "#/$defs/c"}]}}, "$defs": defs}
    assert from_options(prompt=PROMPT, model="gpt-4o-mini", schema=diamond).task.schema_ == diamond


@pytest.mark.parametrize(
    ("spec_json", "names"),
    [
        ('{"task": {"model": "m", "prompt": "p", "params": {"temperature": NaN}}}', "task.params.temperature"),
        ('{"task": {"model": "m", "prompt": "p", "timeout_s": 1e400}}', "task.timeout_s"),
        ('{"task": {"model": "m", "prompt": "p"}, "limits": {"rpm": Infinity}}', "limits.rpm"),
        ('{"task": {"model": "m", "prompt": "p"}, "budget": {"usd": -Infinity}}', "budget.usd"),
        ('{"task": {"model": "m", "prompt": "p", "timeout_s": 1e300}}', "task.timeout_s"),
    ],
)
def test_non_finite_numbers_and_huge_timeouts_are_refused(spec_json: str, names: str) -> None:
    with pytest.raises(SpecError, match=names.replace(".", r"\.")):
        build_spec(json.loads(spec_json))  # what the server and `resume` do with a spec as JSON


def test_nan_in_a_toml_job_file_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'[task]\nmodel = "gpt-4o-mini"\nprompt = "{PROMPT}"\n[task.params]\ntop_p = nan\n')
    with pytest.raises(SpecError, match=r"task\.params\.top_p' is NaN or infinite"):
        from_options(job_file=job)


@pytest.mark.parametrize(("schema", "words"), [(CYCLE, "refers back to itself"), (_deep_schema(300), "deeper than 32")])
def test_ref_cycles_and_deep_schemas_are_one_sentence(schema: dict[str, Any], words: str) -> None:
    with pytest.raises(SpecError, match=words):
        from_options(prompt=PROMPT, model="gpt-4o-mini", schema=schema)


def test_the_server_answers_400_for_each_bad_spec(tmp_path: Path) -> None:
    from test_server import chat_spec, live_server

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "rows.jsonl").write_text('{"id": "a", "text": "x"}\n')
    path = str(inputs / "rows.jsonl")
    reserved = chat_spec(path)
    reserved["task"]["params"]["model"] = "o1-pro"
    cycle = chat_spec(path)
    cycle["task"]["schema"] = CYCLE
    deep = chat_spec(path)
    deep["task"]["schema"] = _deep_schema(300)
    bodies = [json.dumps({"spec": s}) for s in (reserved, cycle, deep)]
    nan = chat_spec(path)
    bodies.append(json.dumps({"spec": nan}).replace('"max_tokens": 20', '"max_tokens": 20, "temperature": NaN'))
    bodies.append(json.dumps({"spec": nan}).replace('"chunk_size": 50', '"chunk_size": 50, "limits": {"rpm": 1e400}'))
    with live_server(tmp_path / "data", allow_dirs=[inputs]) as live, live.client("alice") as client:
        for body in bodies:
            r = client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body[:120], r.status_code, r.text[:300])
            assert "Job spec field" in r.text
