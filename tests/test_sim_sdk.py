"""The official openai and anthropic SDKs work against the simulator unchanged, errors included."""

from __future__ import annotations

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from backfill.sim import KeyLimits, SimConfig, Simulator, chat_answer, messages_answer
from backfill.tokens import count_messages

KEY = "sk-test-sdk"


@pytest.fixture
async def sim():
    config = SimConfig(
        keys={KEY: KeyLimits(), "sk-tiny": KeyLimits(rpm=60, tpm=10_000_000, input_tpm=10**7, output_tpm=10**7)}
    )
    async with Simulator(config) as sim:
        yield sim


def oai(sim: Simulator, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


def ant(sim: Simulator, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=sim.url, api_key=key, max_retries=0)


class Review(BaseModel):
    sentiment: str = Field(json_schema_extra={"enum": ["positive", "negative"]})
    stars: int = Field(ge=1, le=5)
    summary: str = Field(max_length=20)


async def test_openai_chat_is_parsed_with_usage(sim: Simulator) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is this kettle any good at all?"},
    ]
    async with oai(sim) as client:
        response = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=300)
    text = response.choices[0].message.content
    assert text.startswith("Answer to «Is this kettle any good at all?»")
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens == count_messages(messages, "gpt-4o-mini")
    expected = chat_answer({"model": "gpt-4o-mini", "messages": messages, "max_tokens": 300})
    assert text == expected.text and response.usage.completion_tokens == expected.output_tokens
    assert response.model == "gpt-4o-mini" and response.id.startswith("chatcmpl-")


async def test_openai_structured_output_parses_into_the_model(sim: Simulator) -> None:
    async with oai(sim) as client:
        response = await client.chat.completions.parse(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Rate: lovely kettle, boils fast"}],
            response_format=Review,
        )
    review = response.choices[0].message.parsed
    assert isinstance(review, Review)
    assert review.sentiment in ("positive", "negative") and 1 <= review.stars <= 5
    assert review.summary == "Rate: lovely kettle,"[:20]


async def test_openai_embeddings_and_models(sim: Simulator) -> None:
    async with oai(sim) as client:
        default = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input="a", encoding_format="float", dimensions=8
        )
        models = await client.models.list()
    assert [d.index for d in default.data] == [0, 1] and len(default.data[0].embedding) == 64
    assert len(floats.data[0].embedding) == 8
    assert default.usage.prompt_tokens == 2
    assert "gpt-4o-mini" in {m.id for m in models.data}


async def test_openai_typed_errors(sim: Simulator) -> None:
    async with oai(sim, "sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    async with oai(sim) as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
        assert not_found.value.code == "model_not_found"
    async with oai(sim, "sk-tiny") as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_anthropic_messages_tools_and_errors(sim: Simulator) -> None:
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 200,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Summarise the kettle review please"}],
    }
    async with ant(sim) as client:
        message = await client.messages.create(**body)
        assert message.content[0].text == messages_answer(body).text
        assert message.stop_reason == "end_turn" and message.usage.input_tokens > 0
        tool = {"name": "record", "description": "Record a review", "input_schema": Review.model_json_schema()}
        called = await client.messages.create(**body, tools=[tool], tool_choice={"type": "tool", "name": "record"})
        assert called.stop_reason == "tool_use" and called.content[0].type == "tool_use"
        Review.model_validate(called.content[0].input)
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(**{**body, "model": "claude-9"})
    async with ant(sim, "sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(**body)
    async with ant(sim, "sk-tiny") as client:
        await client.messages.create(**body)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(**body)
    assert limited.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
