"""The simulator's structured-output switches: refusing json_schema / json_object the way real
OpenAI-compatible servers do, and answering json_object (with or without a schema) and prompted schemas."""

from __future__ import annotations

import json

import aiohttp
import jsonschema
import pytest
import typer
from typer.testing import CliRunner

from backfill.sim import KeyLimits, SimConfig, Simulator
from backfill.sim.cli import sim_command

OPENAI = {"Authorization": "Bearer sk-any"}
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"type": "string"}}, "required": ["n", "tag"]}


def chat(text: str, **kw: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 100, **kw}


JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "out", "schema": SCHEMA}}


async def post(sim: Simulator, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.base_url + "/chat/completions", json=body, headers=OPENAI) as r:
            return r.status, await r.json()


async def test_a_refused_json_schema_gets_each_servers_error_body() -> None:
    async with Simulator(SimConfig(reject_json_schema=400)) as sim:
        status, body = await post(sim, chat("a", response_format=JSON_SCHEMA))
        assert status == 400
        assert body["error"]["param"] == "response_format" and body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] is None and "json_schema" in body["error"]["message"]
        # Other formats and plain requests are served.
        assert (await post(sim, chat("b", response_format={"type": "json_object"})))[0] == 200
        assert (await post(sim, chat("c")))[0] == 200
        assert [(e.status, e.event, e.admitted) for e in sim.log.entries][0] == (400, "response_format", False)
    async with Simulator(SimConfig(reject_json_schema=422, reject_json_object=422)) as sim:
        status, body = await post(sim, chat("a", response_format=JSON_SCHEMA))
        assert status == 422
        (item,) = body["detail"]
        assert item["loc"] == ["body", "response_format", "type"] and item["input"] == "json_schema"
        assert item["msg"] == "Input should be 'text'"
        with_schema = {"type": "json_object", "schema": SCHEMA}
        assert (await post(sim, chat("b", response_format=with_schema)))[0] == 422
    async with Simulator(SimConfig(reject_json_object=500)) as sim:
        status, body = await post(sim, chat("a", response_format={"type": "json_object"}))
        assert status == 500
        assert body["error"]["type"] == "server_error" and body["error"]["param"] == "response_format"
        assert "response_format" in body["error"]["message"]


async def test_refusals_do_not_count_against_the_rate_limit() -> None:
    async with Simulator(SimConfig(default_limits=KeyLimits(rpm=60), reject_json_schema=400)) as sim:  # holds 1
        statuses = [(await post(sim, chat(f"r{i}", response_format=JSON_SCHEMA)))[0] for i in range(3)]
        assert statuses == [400, 400, 400]
        assert (await post(sim, chat("plain")))[0] == 200


async def test_json_object_follows_a_given_or_prompted_schema() -> None:
    system = {"role": "system", "content": json.dumps(SCHEMA) + "\n\nAnswer with one JSON object matching it."}
    async with Simulator(SimConfig()) as sim:
        _, body = await post(sim, chat("with schema", response_format={"type": "json_object", "schema": SCHEMA}))
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
        prompted = chat("prompted", response_format={"type": "json_object"})
        prompted["messages"].insert(0, system)
        _, body = await post(sim, prompted)
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), SCHEMA)
        plain = chat("no format")
        plain["messages"].insert(0, system)
        _, body = await post(sim, plain)
        answer = json.loads(body["choices"][0]["message"]["content"])
        jsonschema.validate(answer, SCHEMA)
        assert answer["tag"].startswith("no format")
        # A system message without a schema leaves a plain request a text answer.
        other = chat("just text")
        other["messages"].insert(0, {"role": "system", "content": "Be brief {please}."})
        _, body = await post(sim, other)
        assert body["choices"][0]["message"]["content"].startswith("Answer to «just text»")


def test_reject_flags_take_only_the_statuses_servers_send() -> None:
    assert SimConfig(reject_json_schema=422).reject_json_schema == 422
    with pytest.raises(ValueError, match="400, 422 or 500"):
        SimConfig(reject_json_object=404)
    app = typer.Typer()
    app.command("sim")(sim_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["sim", "--reject-json-schema", "418"])
    assert result.exit_code == 2 and "400, 422 or 500" in result.output
