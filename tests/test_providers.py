"""Provider adapters over real HTTP against a small scripted server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from backfill.errors import BackfillError, SpecError
from backfill.providers import (
    AnthropicProvider,
    AzureProvider,
    OpenAIProvider,
    Provider,
    SimProvider,
    StructuredMode,
    get_provider,
    open_provider,
)
from backfill.sim import SimConfig, Simulator
from backfill.providers.headers import parse_duration, parse_instant, parse_retry_after
from backfill.request import OutcomeKind, Request

KEY = "sk-test-SECRET-0123456789abcdef"
HANG = "hang"


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # a dict is sent as JSON, bytes as they are
    headers: dict[str, str] = field(default_factory=dict)


class FakeLLM:
    """Records every request and answers with `reply` (a Reply, HANG, or a function of what it saw)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.peers: set[Any] = set()
        self.reply: Reply | str | Callable[[Seen], Reply] = Reply(body={})
        self.unhang = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        seen = Seen(request.path, dict(request.query), dict(request.headers), json.loads(await request.read()))
        self.seen.append(seen)
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        reply = self.reply(seen) if callable(self.reply) else self.reply
        if reply == HANG:
            await self.unhang.wait()
            return web.Response(status=500)
        assert isinstance(reply, Reply)
        raw = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        return web.Response(status=reply.status, body=raw, headers=reply.headers, content_type="application/json")


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    server = FakeLLM()
    app = web.Application()
    app.router.add_post("/{tail:.*}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.unhang.set()
    await runner.cleanup()


def chat(**kw: Any) -> Request:
    base: dict[str, Any] = {
        "key": "k1",
        "kind": "chat",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }
    return Request(**{**base, **kw})


def openai_answer(content: Any = "hello", finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": finish}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}},
    }


def anthropic_answer(content: list[dict[str, Any]], stop: str = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg",
        "type": "message",
        "role": "assistant",
        "content": content,
        "stop_reason": stop,
        "usage": {
            "input_tokens": 20,
            "output_tokens": 7,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5,
        },
    }


SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


# --- OpenAI-compatible ---------------------------------------------------------------------------


async def test_openai_chat_request_and_response(llm: FakeLLM) -> None:
    llm.reply = Reply(
        body=openai_answer('{"label": "a"}'),
        headers={
            "x-ratelimit-limit-requests": "5000",
            "x-ratelimit-remaining-requests": "4999",
            "x-ratelimit-reset-requests": "12ms",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "1999000",
            "x-ratelimit-reset-tokens": "6m0s",
        },
    )
    params = {"temperature": 0, "max_tokens": 50, "seed": 7, "stop": ["\n"], "logit_bias": {50256: -100}}
    async with OpenAIProvider(base_url=f"{llm.url}/v1", api_key=KEY) as p:
        out = await p.complete(chat(params=params, schema=SCHEMA, schema_name="label_row"))
    seen = llm.seen[0]
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        **params,
        "logit_bias": {"50256": -100},  # a Python caller's int token ids go out as JSON's string keys
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "label_row", "schema": SCHEMA, "strict": False},  # SCHEMA allows extra keys
        },
    }
    assert (out.kind, out.status, out.text, out.finish_reason) == (OutcomeKind.OK, 200, '{"label": "a"}', "stop")
    assert (out.usage.input_tokens, out.usage.output_tokens, out.usage.cached_tokens) == (12, 3, 8)
    assert out.rate is not None
    assert (out.rate.limit_requests, out.rate.remaining_requests, out.rate.limit_tokens) == (5000, 4999, 2_000_000)
    assert out.rate.reset_requests_s == pytest.approx(0.012)
    assert out.rate.reset_tokens_s == 360


async def test_openai_local_server_without_key_or_headers(llm: FakeLLM) -> None:
    llm.reply = Reply(body={"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})  # no usage
    async with OpenAIProvider(base_url=llm.url, api_key=None) as p:
        out = await p.complete(chat())
        assert p.lane_id == f"openai|{llm.url}|nokey"
    assert "Authorization" not in llm.seen[0].headers
    assert "response_format" not in llm.seen[0].body
    assert out.kind is OutcomeKind.OK and out.rate is None and out.usage.input_tokens == 0


async def test_one_session_reuses_connections(llm: FakeLLM) -> None:
    llm.reply = Reply(body=openai_answer())
    async with OpenAIProvider(base_url=llm.url, api_key=KEY) as p:
        for _ in range(20):
            assert (await p.complete(chat())).kind is OutcomeKind.OK
    assert len(llm.peers) == 1


async def test_embeddings_are_packed_and_returned_in_order(llm: FakeLLM) -> None:
    def answer(seen: Seen) -> Reply:
        inputs = seen.body["input"]
        vectors: list[Any] = [[float(i), float(len(text))] for i, text in enumerate(inputs)]
        if seen.body.get("encoding_format") == "base64":
            vectors = [base64.b64encode(array("f", v).tobytes()).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return Reply(body={"data": data[::-1], "usage": {"prompt_tokens": 9, "total_tokens": 9}})

    llm.reply = answer
    texts = ["a", "bb", "ccc"]
    async with OpenAIProvider(base_url=llm.url, api_key=KEY) as p:
        reqs = [Request(key=t, kind="embedding", model="text-embedding-3-small", input=t) for t in texts]
        out = await p.embed(reqs)
        packed = [
            Request(key=t, kind="embedding", model="m", input=t, params={"encoding_format": "base64"}) for t in texts
        ]
        out64 = await p.embed(packed)
    assert llm.seen[0].path == "/embeddings"
    assert llm.seen[0].body == {"model": "text-embedding-3-small", "input": texts}
    assert out.kind is OutcomeKind.OK and out.usage.input_tokens == 9
    assert out.embeddings == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]
    assert out64.embeddings == out.embeddings


async def test_embeddings_with_a_missing_vector_are_malformed(llm: FakeLLM) -> None:
    llm.reply = Reply(body={"data": [{"index": 0, "embedding": [1.0]}]})
    async with OpenAIProvider(base_url=llm.url, api_key=KEY) as p:
        out = await p.embed([Request(key=t, kind="embedding", model="m", input=t) for t in "ab"])
    assert out.kind is OutcomeKind.RETRY and "malformed" in (out.error or "")


async def test_azure_deployment_url_version_and_key(llm: FakeLLM) -> None:
    llm.reply = Reply(body=openai_answer())
    deployment = f"{llm.url}/openai/deployments/gpt4o"
    async with AzureProvider(base_url=f"{deployment}?api-version=2024-06-01", api_key=KEY) as p:
        await p.complete(chat())
        assert p.lane_id.startswith(f"azure|{deployment}|")
    async with AzureProvider(base_url=deployment, api_key=KEY) as p:
        await p.embed([Request(key="e", kind="embedding", model="m", input="x")])
    first, second = llm.seen
    assert first.path == "/openai/deployments/gpt4o/chat/completions"
    assert first.query == {"api-version": "2024-06-01"}
    assert first.headers["api-key"] == KEY and "Authorization" not in first.headers
    assert second.path == "/openai/deployments/gpt4o/embeddings" and second.query["api-version"]
    with pytest.raises(SpecError):
        AzureProvider(base_url="", api_key=KEY)


# --- Anthropic -----------------------------------------------------------------------------------


async def test_anthropic_messages_request_and_structured_answer(llm: FakeLLM) -> None:
    reset_at = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    llm.reply = Reply(
        body=anthropic_answer(
            [{"type": "tool_use", "id": "t", "name": "label_row", "input": {"label": "é"}}], "tool_use"
        ),
        headers={
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-requests-reset": reset_at,
            "anthropic-ratelimit-input-tokens-limit": "400000",
            "anthropic-ratelimit-input-tokens-remaining": "399000",
            "anthropic-ratelimit-output-tokens-limit": "80000",
            "anthropic-ratelimit-output-tokens-remaining": "79000",
            "anthropic-ratelimit-tokens-limit": "80000",
        },
    )
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
    ]
    req = chat(
        model="claude-3-5-haiku-latest",
        messages=messages,
        params={"temperature": 0, "seed": 1, "stop": "END"},
        schema=SCHEMA,
        schema_name="label_row",
        max_output_tokens=300,
    )
    async with AnthropicProvider(base_url=llm.url, api_key=KEY) as p:
        assert p.refunds_output_tokens
        out = await p.complete(req)
    seen = llm.seen[0]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == KEY and seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.body["system"] == "Be terse."
    assert seen.body["messages"] == [{"role": "user", "content": "hi"}]
    assert seen.body["max_tokens"] == 300
    assert seen.body["stop_sequences"] == ["END"] and seen.body["temperature"] == 0 and "seed" not in seen.body
    assert seen.body["tools"][0]["name"] == "label_row" and seen.body["tools"][0]["input_schema"] == SCHEMA
    assert seen.body["tool_choice"] == {"type": "tool", "name": "label_row"}
    assert out.kind is OutcomeKind.OK and json.loads(out.text or "") == {"label": "é"} and out.finish_reason == "stop"
    assert out.structured_mode == "tool"
    assert (out.usage.input_tokens, out.usage.output_tokens, out.usage.cached_tokens) == (125, 7, 100)
    assert out.rate is not None
    assert (out.rate.limit_requests, out.rate.limit_input_tokens, out.rate.limit_output_tokens) == (
        4000,
        400_000,
        80_000,
    )
    assert out.rate.limit_tokens is None
    assert 25 <= (out.rate.reset_requests_s or 0) <= 31


async def test_anthropic_text_answer_default_max_tokens_and_length(llm: FakeLLM) -> None:
    llm.reply = Reply(
        body=anthropic_answer([{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}], "max_tokens")
    )
    async with AnthropicProvider(base_url=llm.url, api_key=KEY) as p:
        out = await p.complete(chat(model="claude-3-5-haiku-latest"))
        with pytest.raises(SpecError):
            await p.embed([Request(key="e", kind="embedding", model="m", input="x")])
    assert (
        llm.seen[0].body["max_tokens"] == 1024 and "system" not in llm.seen[0].body and "tools" not in llm.seen[0].body
    )
    assert (out.kind, out.text, out.finish_reason) == (OutcomeKind.OK, "Hello", "length")


# --- classification ------------------------------------------------------------------------------


def openai_error(code: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": f"Problem with key {KEY}: details", "type": kind, "code": code, "param": None}}


def anthropic_error(kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": f"Problem with key {KEY}: details"}}


RL, RETRY, FATAL, BAD = OutcomeKind.RATE_LIMITED, OutcomeKind.RETRY, OutcomeKind.FATAL, OutcomeKind.BAD_ROW
CASES: list[tuple[str, int, Any, dict[str, str], OutcomeKind, float | None]] = [
    (
        "openai",
        429,
        openai_error("rate_limit_exceeded", "requests"),
        {"retry-after-ms": "250", "retry-after": "1"},
        RL,
        0.25,
    ),
    ("openai", 429, openai_error("insufficient_quota", "insufficient_quota"), {}, FATAL, None),
    ("openai", 500, openai_error(None, "server_error"), {}, RETRY, None),
    ("openai", 502, b"<html>Bad gateway</html>", {}, RETRY, None),
    ("openai", 503, openai_error(None, "server_error"), {"retry-after": "3"}, RETRY, 3.0),
    ("openai", 504, b"", {}, RETRY, None),
    ("openai", 408, openai_error(None, "timeout"), {}, RETRY, None),
    ("openai", 409, openai_error(None, "conflict"), {}, RETRY, None),
    ("openai", 401, openai_error("invalid_api_key", "invalid_request_error"), {}, FATAL, None),
    ("openai", 403, openai_error("unsupported_country_region_territory", "request_forbidden"), {}, FATAL, None),
    ("openai", 404, openai_error("model_not_found", "invalid_request_error"), {}, FATAL, None),
    ("openai", 400, openai_error("model_not_found", "invalid_request_error"), {}, FATAL, None),
    ("openai", 400, openai_error("context_length_exceeded", "invalid_request_error"), {}, BAD, None),
    ("openai", 413, openai_error(None, "invalid_request_error"), {}, BAD, None),
    (
        "openai",
        422,
        {"object": "error", "message": f"bad {KEY}", "type": "BadRequestError", "code": 422},
        {},
        BAD,
        None,
    ),
    ("openai", 400, {"error": f"ollama says {KEY}"}, {}, BAD, None),
    ("openai", 418, b"teapot", {}, BAD, None),
    ("anthropic", 429, anthropic_error("rate_limit_error"), {"retry-after": "2"}, RL, 2.0),
    ("anthropic", 529, anthropic_error("overloaded_error"), {}, RETRY, None),
    ("anthropic", 500, anthropic_error("api_error"), {}, RETRY, None),
    ("anthropic", 402, anthropic_error("billing_error"), {}, FATAL, None),
    ("anthropic", 401, anthropic_error("authentication_error"), {}, FATAL, None),
    ("anthropic", 403, anthropic_error("permission_error"), {}, FATAL, None),
    ("anthropic", 404, anthropic_error("not_found_error"), {}, FATAL, None),
    ("anthropic", 400, anthropic_error("invalid_request_error"), {}, BAD, None),
    ("anthropic", 413, anthropic_error("request_too_large"), {}, BAD, None),
]


@pytest.mark.parametrize(("name", "status", "body", "headers", "kind", "retry_after"), CASES)
async def test_failures_are_classified_without_leaking_the_key(
    llm: FakeLLM,
    name: str,
    status: int,
    body: Any,
    headers: dict[str, str],
    kind: OutcomeKind,
    retry_after: float | None,
) -> None:
    llm.reply = Reply(status=status, body=body, headers=headers)
    async with get_provider(name)(base_url=llm.url, api_key=KEY) as p:
        out = await p.complete(chat())
    assert (out.kind, out.status) == (kind, status)
    assert out.error and KEY not in out.error
    assert out.retry_after == retry_after
    if kind is BAD and isinstance(body, dict):
        assert "***" in out.error  # the provider's message is shown, with the key blanked out


async def test_a_key_is_blanked_before_a_long_message_is_shortened(llm: FakeLLM) -> None:
    llm.reply = Reply(status=400, body={"error": {"message": "x " * 145 + KEY, "code": None}})
    async with OpenAIProvider(base_url=llm.url, api_key=KEY) as p:
        out = await p.complete(chat())
    assert out.kind is BAD and out.error and KEY[:8] not in out.error


@pytest.mark.parametrize(
    ("name", "headers", "request_tokens", "kind"),
    [
        ("openai", {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0"}, (900, 200), BAD),
        ("openai", {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0"}, (700, 200), RL),
        (
            "anthropic",
            {"anthropic-ratelimit-output-tokens-limit": "800", "anthropic-ratelimit-output-tokens-remaining": "0"},
            (10, 1024),
            BAD,
        ),
        (
            "anthropic",
            {"anthropic-ratelimit-input-tokens-limit": "800", "anthropic-ratelimit-input-tokens-remaining": "0"},
            (900, 10),
            BAD,
        ),
        (
            "anthropic",
            {"anthropic-ratelimit-input-tokens-limit": "800", "anthropic-ratelimit-input-tokens-remaining": "0"},
            (700, 10),
            RL,
        ),
    ],
)
async def test_a_429_no_wait_can_cure_is_a_bad_row(
    llm: FakeLLM, name: str, headers: dict[str, str], request_tokens: tuple[int, int], kind: OutcomeKind
) -> None:
    llm.reply = Reply(status=429, body=openai_error("rate_limit_exceeded", "tokens"), headers=headers)
    prompt_tokens, max_output_tokens = request_tokens
    async with get_provider(name)(base_url=llm.url, api_key=KEY) as p:
        out = await p.complete(chat(counted_tokens=prompt_tokens, max_output_tokens=max_output_tokens))
    assert out.kind is kind
    if kind is BAD:
        assert "too large for the rate limit" in (out.error or "")


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"not json", RETRY),
        ({"object": "chat.completion"}, RETRY),
        ({"choices": []}, RETRY),
        (openai_answer(None), RETRY),
        (openai_answer("", finish="content_filter"), BAD),
        (openai_answer(None, refusal="I can't help with that."), BAD),
        (openai_answer(None, finish="length"), OutcomeKind.OK),
    ],
    ids=["not-json", "no-choices", "empty-choices", "null-content", "content-filter", "refusal", "length"],
)
async def test_openai_200_bodies(llm: FakeLLM, body: Any, kind: OutcomeKind) -> None:
    llm.reply = Reply(body=body)
    async with OpenAIProvider(base_url=llm.url, api_key=KEY) as p:
        out = await p.complete(chat())
    assert out.kind is kind and out.status == 200
    if kind is BAD:
        assert "refused" in (out.error or "")


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"{", RETRY),
        ({"type": "message"}, RETRY),
        (anthropic_answer([{"type": "text", "text": "no tool"}]), RETRY),  # a schema was asked for
        (anthropic_answer([], "refusal"), BAD),
    ],
    ids=["not-json", "no-content", "no-tool-call", "refusal"],
)
async def test_anthropic_200_bodies(llm: FakeLLM, body: Any, kind: OutcomeKind) -> None:
    llm.reply = Reply(body=body)
    async with AnthropicProvider(base_url=llm.url, api_key=KEY) as p:
        out = await p.complete(chat(model="claude-3-5-haiku-latest", schema=SCHEMA))
    assert out.kind is kind


async def test_timeout_is_retry(llm: FakeLLM) -> None:
    llm.reply = HANG
    async with OpenAIProvider(base_url=llm.url, api_key=KEY, timeout_s=0.3) as p:
        out = await p.complete(chat())
    assert (out.kind, out.status) == (RETRY, 0)
    assert "did not answer within 0.3 s" in (out.error or "")


async def _raw_server(answer: bytes) -> asyncio.Server:
    """Reads a request's head, writes `answer` (possibly nothing, possibly cut short) and hangs up."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(on_connection, "127.0.0.1", 0)


@pytest.mark.parametrize(
    "answer",
    [b"", b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"choices": ['],
    ids=["hang-up", "cut-short"],
)
async def test_resets_and_truncated_bodies_are_retry(answer: bytes) -> None:
    server = await _raw_server(answer)
    port = server.sockets[0].getsockname()[1]
    try:
        async with AnthropicProvider(base_url=f"http://127.0.0.1:{port}", api_key=KEY) as p:
            out = await p.complete(chat())
    finally:
        server.close()
        await server.wait_closed()
    assert (out.kind, out.status) == (RETRY, 0) and KEY not in (out.error or "")


async def test_connection_refused_is_retry() -> None:
    server = await _raw_server(b"")
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with OpenAIProvider(base_url=f"http://127.0.0.1:{port}", api_key=KEY) as p:
        out = await p.complete(chat())
    assert out.kind is RETRY and "connection" in (out.error or "")


async def test_a_base_url_with_credentials_and_a_bearer_key_is_refused_before_sending(llm: FakeLLM) -> None:
    base_url = "http://user:pa55word@" + llm.url[len("http://") :]
    with pytest.raises(SpecError, match="base URL") as refused:
        OpenAIProvider(base_url=base_url, api_key=KEY)
    assert KEY not in str(refused.value) and "pa55word" not in str(refused.value)
    llm.reply = Reply(body=openai_answer())
    async with OpenAIProvider(base_url=base_url, api_key=None) as p:  # the URL's credentials alone: basic auth
        out = await p.complete(chat())
    assert out.kind is OutcomeKind.OK and llm.seen[0].headers["Authorization"].startswith("Basic ")


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:99999/v1", "http://[::1/v1"])
async def test_a_base_url_that_cannot_be_parsed_is_fatal(base_url: str) -> None:
    async with OpenAIProvider(base_url=base_url, api_key=KEY) as p:
        first, again = await p.complete(chat()), await p.complete(chat())
    for out in (first, again):
        assert out.kind is OutcomeKind.FATAL and "base URL" in (out.error or "") and KEY not in (out.error or "")


# --- registry, identity, header parsing ----------------------------------------------------------


def test_registry_and_lane_id() -> None:
    assert {get_provider(n).name for n in ("openai", "azure", "anthropic")} == {"openai", "azure", "anthropic"}
    with pytest.raises(SpecError, match="anthropic, azure, openai, sim"):
        get_provider("gemini")
    p: Provider = OpenAIProvider(base_url="https://api.openai.com/v1/", api_key=KEY)
    assert p.lane_id == f"openai|https://api.openai.com/v1|{hashlib.sha256(KEY.encode()).hexdigest()[:8]}"
    assert KEY not in p.lane_id and KEY not in repr(p) and not p.refunds_output_tokens
    assert AnthropicProvider(api_key=KEY).base_url == "https://api.anthropic.com"


def test_adapters_carry_their_own_facts() -> None:
    local, azure_url = "http://localhost:8000/v1", "https://team.openai.azure.com/openai/deployments/gpt4o"
    openai_, azure, anthropic, sim = (get_provider(n) for n in ("openai", "azure", "anthropic", "sim"))
    assert (openai_.key_env, azure.key_env, anthropic.key_env, sim.key_env) == (
        "OPENAI_API_KEY",
        "AZURE_OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        None,
    )
    # A key and a price where the provider's cloud bills; a compatible server elsewhere may need neither.
    assert openai_.needs_key_for(None) and openai_.needs_key_for("https://api.openai.com/v1")
    assert not openai_.needs_key_for(local) and not openai_.needs_price(local)
    assert openai_.needs_price(None) and openai_.needs_price("https://API.openai.com/v1")
    assert azure.needs_key_for(azure_url) and azure.needs_price(azure_url) and azure.needs_key_for(local)
    assert anthropic.needs_key_for(None) and anthropic.needs_price(None) and not anthropic.needs_price(local)
    assert not sim.needs_key_for(None) and not sim.needs_price(None) and not sim.needs_price(local)
    assert sim.starts_simulator and not openai_.starts_simulator
    assert not anthropic.supports_embeddings and openai_.supports_embeddings and sim.supports_embeddings
    assert anthropic.default_params == {"max_tokens": 1024} and openai_.default_params == {}
    assert openai_.structured_modes[0] is StructuredMode.JSON_SCHEMA and sim.structured_modes == openai_.structured_modes
    assert anthropic.structured_modes == (StructuredMode.TOOL,)
    assert AnthropicProvider(api_key=KEY).structured_mode is StructuredMode.TOOL


async def test_open_provider_starts_the_builtin_simulator_only_without_a_base_url() -> None:
    async with open_provider("sim", base_url=None, api_key=None, timeout_s=10, max_connections=4) as p:
        assert isinstance(p, SimProvider) and p.lane_id.startswith("sim|http://127.0.0.1:")
        out = await p.complete(chat())
        assert out.kind is OutcomeKind.OK and (out.text or "").startswith("Answer to «hi»")
    assert p._session is None  # closed with the context
    async with Simulator(SimConfig()) as sim:
        async with open_provider("sim", base_url=sim.base_url, api_key="sk-1", timeout_s=10, max_connections=4) as p:
            out = await p.complete(chat(schema=SCHEMA))
        async with open_provider("openai", base_url=sim.base_url, api_key="sk-1", timeout_s=10, max_connections=4) as o:
            assert o.lane_id.startswith(f"openai|{sim.base_url}|")
        assert len(sim.log) == 1 and out.structured_mode == "json_schema"
    with pytest.raises(SpecError, match="base URL"):
        async with open_provider("azure", base_url=None, api_key=KEY, timeout_s=10, max_connections=4):
            pass


async def test_anthropic_embeddings_fail_at_once_with_a_sentence() -> None:
    async with AnthropicProvider(base_url="http://127.0.0.1:9", api_key=KEY) as p:
        with pytest.raises(BackfillError, match="no embeddings endpoint"):
            await asyncio.wait_for(p.embed([Request(key="e", kind="embedding", model="m", input="x")]), 1)


def test_header_parsing() -> None:
    assert parse_duration("1s") == 1 and parse_duration("6m0s") == 360 and parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5) and parse_duration("0.5") == 0.5
    assert parse_duration("soon") is None
    now = time.time()
    assert parse_instant("2030-01-01T00:00:10Z", now=datetime(2030, 1, 1, tzinfo=UTC).timestamp()) == 10
    assert parse_instant("2000-01-01T00:00:00+00:00", now=now) == 0
    assert parse_retry_after({"retry-after": "7"}) == 7
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "7"}) == 1.5
    later = datetime.now(UTC) + timedelta(seconds=120)
    assert 110 <= (parse_retry_after({"retry-after": format_datetime(later, usegmt=True)}) or 0) <= 121
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "whenever"}) is None


def test_strict_structured_output_only_for_schemas_openai_accepts_as_strict() -> None:
    from backfill.providers.openai import _strict_ok

    strict = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    assert _strict_ok(strict)
    assert not _strict_ok({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    nested = {**strict, "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    assert not _strict_ok(nested)
