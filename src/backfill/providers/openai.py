"""OpenAI-compatible chat completions and embeddings (OpenAI, vLLM, llama.cpp, Ollama's /v1, the
simulator), and Azure OpenAI deployments, which speak the same bodies with other URLs and auth.

A schema request goes out in the adapter's structured-output mode; a server that refuses that mode's
`response_format` gets the same request again at once in the next mode, so the row pays no attempt."""

from __future__ import annotations

import base64
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import orjson

from backfill.errors import SpecError
from backfill.providers.base import Provider, Reply, without_userinfo
from backfill.providers.headers import openai_rate
from backfill.providers.structured import (
    StructuredMode,
    rejects_response_format,
    schema_instruction,
    unfenced,
    with_instruction,
)
from backfill.request import Outcome, OutcomeKind, RateLimitInfo, Request, Usage

AZURE_API_VERSION = "2024-10-21"


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        input_tokens=raw.get("prompt_tokens") or 0,
        output_tokens=raw.get("completion_tokens") or 0,
        cached_tokens=cached or 0,
    )


def _vector(raw: Any) -> list[float]:
    # encoding_format="base64" packs little-endian float32s.
    return array("f", base64.b64decode(raw)).tolist() if isinstance(raw, str) else raw


def _strict_ok(schema: Any) -> bool:
    """OpenAI's strict mode accepts only schemas whose objects list every property as required and
    forbid others; sending strict with any other schema gets every row a 400, so ask for it only then."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            props = schema.get("properties", {})
            if schema.get("additionalProperties") is not False or set(schema.get("required", [])) != set(props):
                return False
        return all(_strict_ok(v) for k, v in schema.items() if k not in ("enum", "const", "default", "required"))
    if isinstance(schema, list):
        return all(_strict_ok(v) for v in schema)
    return True


@dataclass(frozen=True, slots=True)
class _SchemaParts:
    """What each mode adds for one schema, built once per job's schema rather than once per request."""

    schema: dict[str, Any]
    name: str
    json_schema: dict[str, Any]
    json_object_schema: dict[str, Any]
    instruction: str

    @classmethod
    def of(cls, schema: dict[str, Any], name: str) -> _SchemaParts:
        return cls(
            schema,
            name,
            {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": _strict_ok(schema)}},
            {"type": "json_object", "schema": schema},
            schema_instruction(schema),
        )


_JSON_OBJECT = {"type": "json_object"}


class OpenAIProvider(Provider):
    """POST {base_url}/chat/completions and {base_url}/embeddings with a Bearer key (none for local servers)."""

    name = "openai"
    default_base_url = "https://api.openai.com/v1"
    key_env = "OPENAI_API_KEY"
    cloud_hosts = ("api.openai.com",)
    structured_modes: ClassVar[tuple[StructuredMode, ...]] = (
        StructuredMode.JSON_SCHEMA,
        StructuredMode.JSON_OBJECT_SCHEMA,
        StructuredMode.JSON_OBJECT,
        StructuredMode.PROMPT,
    )

    _parts: _SchemaParts | None = None

    @classmethod
    def needs_key_for(cls, base_url: str | None) -> bool:
        # Self-hosted OpenAI-compatible servers usually take no key.
        return cls.needs_key and cls.on_cloud(base_url)

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        # aiohttp sends a URL's user:password as the Authorization header, which the key needs too.
        # (A URL that cannot be parsed is reported when the first request is sent.)
        if "@" in self.base_url.partition("//")[2].partition("/")[0]:
            raise SpecError(
                "The base URL carries a user name and password and an API key is set too; keep only one of them."
            )
        return {"Authorization": f"Bearer {api_key}"}

    def _endpoint(self, path: str) -> str:
        return f"{self.base_url}/{path}"

    async def complete(self, request: Request) -> Outcome:
        if request.schema is not None:
            return await self._modes.send(lambda: self._complete_structured(request))
        body: dict[str, Any] = {"model": request.model, "messages": request.messages, **request.params}
        reply = await self._post(self._endpoint("chat/completions"), body)
        if isinstance(reply, Outcome):
            return reply
        outcome = self._chat_outcome(reply) if 200 <= reply.status < 300 else self._failure(reply, request.model)
        outcome.rate = openai_rate(reply.headers)
        return self._no_wait_cures(outcome, request)

    async def _complete_structured(self, request: Request) -> Outcome:
        """Send in the current mode; on a refusal of the mode, move on and send again at once."""
        state = self._modes
        mode = state.current
        while True:
            if state.exhausted or mode is None:
                return self._every_mode_refused()
            reply = await self._post(self._endpoint("chat/completions"), self._structured_body(request, mode))
            if isinstance(reply, Outcome):
                reply.structured_mode = mode.value
                return reply
            if 200 <= reply.status < 300:
                outcome = self._chat_outcome(reply)
                if mode is StructuredMode.PROMPT and outcome.text is not None:
                    outcome.text = unfenced(outcome.text)
            elif mode.sends_response_format and rejects_response_format(reply.status, reply.body):
                mode = state.advance(mode)
                continue
            else:
                outcome = self._failure(reply, request.model)
            if 200 <= reply.status < 300 or outcome.kind is OutcomeKind.BAD_ROW:
                state.confirm(mode)  # the server took the request in this mode
            outcome.rate = openai_rate(reply.headers)
            outcome.structured_mode = mode.value
            return self._no_wait_cures(outcome, request)

    def _structured_body(self, request: Request, mode: StructuredMode) -> dict[str, Any]:
        parts = self._parts
        # A job's requests share one schema object; equality covers a caller that copies it.
        if parts is None or parts.name != request.schema_name or (
            parts.schema is not request.schema and parts.schema != request.schema
        ):
            assert request.schema is not None
            parts = self._parts = _SchemaParts.of(request.schema, request.schema_name)
        messages = with_instruction(request.messages or [], parts.instruction) if mode.instructs else request.messages
        body: dict[str, Any] = {"model": request.model, "messages": messages, **request.params}
        if mode is StructuredMode.JSON_SCHEMA:
            body["response_format"] = parts.json_schema
        elif mode is StructuredMode.JSON_OBJECT_SCHEMA:
            body["response_format"] = parts.json_object_schema
        elif mode is StructuredMode.JSON_OBJECT:
            body["response_format"] = _JSON_OBJECT
        else:
            body.pop("response_format", None)  # the server refuses it, also when the job's params carry one
        return body

    def _every_mode_refused(self) -> Outcome:
        modes = ", ".join(m.value for m in self.structured_modes)
        return Outcome(
            OutcomeKind.FATAL,
            error=(
                f"The server at {without_userinfo(self.base_url)} rejects every structured-output mode ({modes}); "
                "use a model or server that supports one of them, or run the job without a schema."
            ),
            structured_mode=self.structured_modes[-1].value if self.structured_modes else None,
        )

    async def embed(self, requests: list[Request]) -> Outcome:
        if not requests:
            raise ValueError("embed() needs at least one request")
        first = requests[0]
        body: dict[str, Any] = {"model": first.model, "input": [r.input for r in requests], **first.params}
        reply = await self._post(self._endpoint("embeddings"), body)
        if isinstance(reply, Outcome):
            return reply
        outcome = (
            self._embedding_outcome(reply, len(requests))
            if 200 <= reply.status < 300
            else self._failure(reply, first.model)
        )
        outcome.rate = openai_rate(reply.headers)
        return outcome

    def _oversized(self, rate: RateLimitInfo, request: Request) -> str | None:
        tokens = request.prompt_tokens + request.max_output_tokens
        if rate.limit_tokens is not None and tokens > rate.limit_tokens:
            return f"{tokens} tokens against {rate.limit_tokens} tokens/min"
        return None

    def _chat_outcome(self, reply: Reply) -> Outcome:
        try:
            data = orjson.loads(reply.body)
            choice = data["choices"][0]
            message = choice["message"]
            finish = choice.get("finish_reason")
            refusal = message.get("refusal")
            content = message.get("content")
            usage = _usage(data.get("usage"))
        except (ValueError, LookupError, TypeError, AttributeError):
            return self._malformed(reply)
        if finish == "content_filter" or refusal:
            why = f"refused by the model: {refusal}" if isinstance(refusal, str) else "refused by the content filter"
            return Outcome(OutcomeKind.BAD_ROW, status=reply.status, finish_reason=finish, usage=usage, error=why[:300])
        if isinstance(content, list):  # some compatible servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            if finish != "length":
                return self._malformed(reply)
            content = ""  # the whole max_tokens went to reasoning; retrying would do the same
        return Outcome(OutcomeKind.OK, status=reply.status, text=content, finish_reason=finish, usage=usage)

    def _embedding_outcome(self, reply: Reply, n: int) -> Outcome:
        try:
            data = orjson.loads(reply.body)
            items = sorted(data["data"], key=lambda item: item["index"])
            vectors = [_vector(item["embedding"]) for item in items]
            raw_usage = data.get("usage")
            tokens = raw_usage.get("prompt_tokens") or 0 if isinstance(raw_usage, dict) else 0
        except (ValueError, LookupError, TypeError, AttributeError):
            return self._malformed(reply)
        if len(vectors) != n or not all(isinstance(v, list) for v in vectors):
            return self._malformed(reply)
        return Outcome(OutcomeKind.OK, status=reply.status, embeddings=vectors, usage=Usage(input_tokens=tokens))


class AzureProvider(OpenAIProvider):
    """base_url is the deployment URL (…/openai/deployments/NAME), optionally with ?api-version=…"""

    name = "azure"
    default_base_url = None
    key_env = "AZURE_OPENAI_API_KEY"
    # Azure OpenAI, Azure AI Foundry and Cognitive Services resources all live under azure.com.
    cloud_hosts = (".azure.com",)

    @classmethod
    def needs_key_for(cls, base_url: str | None) -> bool:
        return cls.needs_key

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None,
        timeout_s: float = 60.0,
        max_connections: int = 256,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url or "")
        self.api_version = parse_qs(parts.query).get("api-version", [AZURE_API_VERSION])[0]
        deployment = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        super().__init__(
            base_url=deployment, api_key=api_key, timeout_s=timeout_s, max_connections=max_connections, headers=headers
        )

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def _endpoint(self, path: str) -> str:
        return f"{self.base_url}/{path}?api-version={self.api_version}"
