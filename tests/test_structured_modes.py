"""Structured-output fallback: the OpenAI-compatible adapter moves from json_schema to the next mode
when a server refuses it (400, 422, 500), without charging the row an attempt — over HTTP, against
the simulator's switches."""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import jsonschema
import orjson
import pytest

from backfill.providers import OpenAIProvider, StructuredMode
from backfill.providers.structured import ModeState, rejects_response_format, unfenced
from backfill.request import OutcomeKind, Request
from backfill.sim import SimConfig, Simulator

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["good", "bad"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["label", "score"],
    "additionalProperties": False,
}
ROWS = 12


def schema_request(i: int, **kw: Any) -> Request:
    messages = [{"role": "user", "content": f"Rate review {i}: the kettle works"}]
    return Request(key=f"k{i}", kind="chat", model="gpt-4o-mini", messages=messages, schema=SCHEMA, **kw)


async def send_all(provider: OpenAIProvider, n: int = ROWS) -> list[Any]:
    return await asyncio.gather(*(provider.complete(schema_request(i)) for i in range(n)))


def assert_valid_answers(outcomes: list[Any], mode: str) -> None:
    for out in outcomes:
        assert out.kind is OutcomeKind.OK, out.error
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.structured_mode == mode


@pytest.mark.parametrize("status", [400, 422, 500])
async def test_a_refused_json_schema_falls_back_to_json_object_with_schema(status: int) -> None:
    async with Simulator(SimConfig(reject_json_schema=status)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            outcomes = await send_all(provider)
            assert provider.structured_mode is StructuredMode.JSON_OBJECT_SCHEMA
        statuses = sim.log.count_by_status()
    assert_valid_answers(outcomes, "json_object_schema")
    # One request found out; the rest waited for it and went out in the mode that works.
    assert statuses == {status: 1, 200: ROWS}


async def test_json_schema_and_json_object_refused_ends_in_prompt_mode() -> None:
    async with Simulator(SimConfig(reject_json_schema=422, reject_json_object=400)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            outcomes = await send_all(provider)
            assert provider.structured_mode is StructuredMode.PROMPT
        statuses = sim.log.count_by_status()
    assert_valid_answers(outcomes, "prompt")
    assert statuses == {422: 1, 400: 2, 200: ROWS}  # json_object_schema and json_object both refused once


async def test_refusals_that_cross_in_flight_advance_each_mode_once() -> None:
    async with Simulator(SimConfig(reject_json_schema=400, reject_json_object=422)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            # As when a server (or one behind a load balancer) starts refusing a mode that worked:
            # every request in flight goes out in it at once.
            provider._modes.confirmed = True
            outcomes = await send_all(provider)
            assert provider.structured_mode is StructuredMode.PROMPT
        statuses = sim.log.count_by_status()
    assert_valid_answers(outcomes, "prompt")
    assert statuses == {400: ROWS, 422: 2 * ROWS, 200: ROWS}


async def test_use_structured_mode_sends_the_first_request_in_the_restored_mode() -> None:
    async with Simulator(SimConfig(reject_json_schema=400, reject_json_object=400)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            provider.use_structured_mode("prompt")
            first = await provider.complete(schema_request(0))
            with pytest.raises(ValueError, match="tool"):
                provider.use_structured_mode(StructuredMode.TOOL)
        statuses = sim.log.count_by_status()
    assert_valid_answers([first], "prompt")
    assert statuses == {200: 1}


async def test_a_refused_restored_mode_still_falls_back() -> None:
    async with Simulator(SimConfig(reject_json_object=500)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            provider.use_structured_mode(StructuredMode.JSON_OBJECT_SCHEMA)
            outcomes = await send_all(provider, 4)
        statuses = sim.log.count_by_status()
    assert_valid_answers(outcomes, "prompt")  # json_object_schema, then json_object, refused
    assert statuses == {500: 2, 200: 4}


class _NoPromptProvider(OpenAIProvider):
    structured_modes: ClassVar[tuple[StructuredMode, ...]] = (StructuredMode.JSON_SCHEMA, StructuredMode.JSON_OBJECT)


async def test_every_mode_refused_is_fatal_in_one_sentence() -> None:
    async with Simulator(SimConfig(reject_json_schema=400, reject_json_object=422)) as sim:
        # Credentials in the base URL (sent as basic auth) must not reach the message.
        async with _NoPromptProvider(base_url="http://user:pw@" + sim.base_url[7:], api_key=None) as provider:
            outcomes = await send_all(provider, 6)
        arrivals = len(sim.log)
    assert {o.kind for o in outcomes} == {OutcomeKind.FATAL}
    error = outcomes[0].error
    assert error.startswith(f"The server at {sim.base_url} rejects every structured-output mode (json_schema, json_object)")
    assert "pw" not in error and error.count(". ") == 0
    assert arrivals == 2  # one refusal per mode; the rest were not sent


async def test_an_error_about_another_parameter_does_not_fall_back() -> None:
    async with Simulator(SimConfig(reject_json_object=400)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            out = await provider.complete(schema_request(0, params={"max_tokens": -1}))  # sim: 400, param max_tokens
            assert provider.structured_mode is StructuredMode.JSON_SCHEMA
            ok = await provider.complete(schema_request(1))
        statuses = [e.status for e in sim.log.entries]
    assert out.kind is OutcomeKind.BAD_ROW and out.structured_mode == "json_schema"
    assert_valid_answers([ok], "json_schema")
    assert statuses == [400, 200]


async def test_requests_without_a_schema_carry_no_mode() -> None:
    async with Simulator(SimConfig(reject_json_schema=400)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            out = await provider.complete(Request(key="t", kind="chat", model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]))
    assert out.kind is OutcomeKind.OK and out.structured_mode is None and out.text.startswith("Answer to «hi»")


async def test_a_system_message_keeps_its_place_in_prompt_mode() -> None:
    async with Simulator(SimConfig(reject_json_schema=400, reject_json_object=400)) as sim:
        async with OpenAIProvider(base_url=sim.base_url, api_key="sk-x") as provider:
            provider.use_structured_mode(StructuredMode.PROMPT)
            messages = [{"role": "system", "content": "You rate reviews {strictly}."}, {"role": "user", "content": "ok"}]
            out = await provider.complete(Request(key="s", kind="chat", model="gpt-4o-mini", messages=messages, schema=SCHEMA))
    assert_valid_answers([out], "prompt")
    assert messages[0]["content"] == "You rate reviews {strictly}."  # the job's messages are not changed


@pytest.mark.parametrize(
    ("status", "body", "refused"),
    [
        (400, {"error": {"message": "x", "type": "invalid_request_error", "param": "response_format", "code": None}}, True),
        (400, {"error": {"message": "bad", "param": "response_format.json_schema.schema"}}, True),
        (400, {"error": {"message": "response_format is wrong", "param": "messages"}}, False),
        (422, {"detail": [{"loc": ["body", "response_format", "type"], "msg": "Input should be 'text'"}]}, True),
        (422, {"detail": [{"loc": ["body", "messages", 0], "msg": "response_format mentioned"}]}, False),
        (500, {"error": {"message": "boom", "type": "server_error", "param": None}}, False),
        (500, {"object": "error", "message": "response_format json_schema is not supported", "param": None}, True),
        (503, {"error": {"message": "x", "param": "response_format"}}, False),
        (429, {"error": {"message": "x", "param": "response_format"}}, False),
        (400, {"error": "unknown field response_format"}, True),
        (400, {"error": "bad prompt"}, False),
    ],
)
def test_refusals_are_read_from_the_error_structure(status: int, body: dict[str, Any], refused: bool) -> None:
    assert rejects_response_format(status, orjson.dumps(body)) is refused


def test_a_mode_advances_once_however_many_refusals_cross() -> None:
    modes = (StructuredMode.JSON_SCHEMA, StructuredMode.JSON_OBJECT, StructuredMode.PROMPT)
    state = ModeState(modes)
    assert state.advance(StructuredMode.JSON_SCHEMA) is StructuredMode.JSON_OBJECT
    assert state.advance(StructuredMode.JSON_SCHEMA) is StructuredMode.JSON_OBJECT  # a late refusal of the old mode
    assert state.current is StructuredMode.JSON_OBJECT
    assert state.advance(StructuredMode.JSON_OBJECT) is StructuredMode.PROMPT
    assert state.advance(StructuredMode.PROMPT) is None and state.exhausted
    assert state.advance(StructuredMode.JSON_SCHEMA) is None


def test_prompted_answers_lose_their_code_fence() -> None:
    assert unfenced('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert unfenced('{"a": 1}') == '{"a": 1}'
