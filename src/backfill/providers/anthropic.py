"""Anthropic Messages: system prompt at the top level, max_tokens required, structured output
through one forced tool, and usage counted as input, output and cache reads."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import orjson

from backfill.errors import SpecError
from backfill.providers.base import Provider, Reply
from backfill.providers.headers import anthropic_rate
from backfill.providers.structured import StructuredMode
from backfill.request import Outcome, OutcomeKind, RateLimitInfo, Request, Usage

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
# OpenAI-style parameter names that Anthropic spells differently.
_RENAMED = {"stop": "stop_sequences", "max_completion_tokens": "max_tokens"}
# Anthropic has no seed; it stays in the request key, so answers are still cached per seed.
_DROPPED = frozenset({"seed"})
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "stop", "max_tokens": "length"}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _usage(raw: Any) -> Usage:
    """Input tokens include cache reads and writes, as OpenAI's prompt_tokens include cached ones."""
    if not isinstance(raw, dict):
        return Usage()
    cache_read = raw.get("cache_read_input_tokens") or 0
    cache_write = raw.get("cache_creation_input_tokens") or 0
    return Usage(
        input_tokens=(raw.get("input_tokens") or 0) + cache_read + cache_write,
        output_tokens=raw.get("output_tokens") or 0,
        cached_tokens=cache_read,
    )


def _max_tokens(request: Request) -> int:
    params = request.params
    return (
        params.get("max_tokens")
        or params.get("max_completion_tokens")
        or request.max_output_tokens
        or DEFAULT_MAX_TOKENS
    )


def messages_body(request: Request) -> dict[str, Any]:
    """The /v1/messages body for a chat request."""
    system = [_text(m.get("content")) for m in request.messages or [] if m.get("role") == "system"]
    messages = [m for m in request.messages or [] if m.get("role") != "system"]
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": _max_tokens(request),
        "messages": messages,
    }
    if system:
        body["system"] = "\n\n".join(system)
    for key, value in request.params.items():
        if key in _DROPPED:
            continue
        key = _RENAMED.get(key, key)
        body[key] = [value] if key == "stop_sequences" and isinstance(value, str) else value
    if request.schema is not None:
        body["tools"] = [
            {
                "name": request.schema_name,
                "description": "Record the answer in this structure.",
                "input_schema": request.schema,
            }
        ]
        body["tool_choice"] = {"type": "tool", "name": request.schema_name}
    return body


class AnthropicProvider(Provider):
    """POST {base_url}/v1/messages with x-api-key and anthropic-version."""

    name = "anthropic"
    default_base_url = "https://api.anthropic.com"
    protocol_headers: ClassVar[Mapping[str, str]] = {"anthropic-version": ANTHROPIC_VERSION}
    key_env = "ANTHROPIC_API_KEY"
    cloud_hosts = ("api.anthropic.com",)
    supports_embeddings = False
    default_params: ClassVar[Mapping[str, Any]] = MappingProxyType({"max_tokens": DEFAULT_MAX_TOKENS})  # required
    structured_modes: ClassVar[tuple[StructuredMode, ...]] = (StructuredMode.TOOL,)

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    @property
    def refunds_output_tokens(self) -> bool:
        return True

    async def complete(self, request: Request) -> Outcome:
        reply = await self._post(f"{self.base_url}/v1/messages", messages_body(request))
        if isinstance(reply, Outcome):
            outcome = reply
        else:
            if 200 <= reply.status < 300:
                outcome = self._message_outcome(reply, request.schema_name if request.schema is not None else None)
            else:
                outcome = self._failure(reply, request.model)
            outcome.rate = anthropic_rate(reply.headers)
        if request.schema is not None:
            outcome.structured_mode = StructuredMode.TOOL.value
        return self._no_wait_cures(outcome, request)

    async def embed(self, requests: list[Request]) -> Outcome:
        # The plan refuses embedding jobs for adapters without supports_embeddings; this is the backstop.
        raise SpecError("Anthropic has no embeddings endpoint; run embedding jobs with an OpenAI-compatible provider.")

    def _oversized(self, rate: RateLimitInfo, request: Request) -> str | None:
        max_tokens = _max_tokens(request)
        if rate.limit_input_tokens is not None and request.prompt_tokens > rate.limit_input_tokens:
            return f"{request.prompt_tokens} input tokens against {rate.limit_input_tokens} input tokens/min"
        if rate.limit_output_tokens is not None and max_tokens > rate.limit_output_tokens:
            return f"max_tokens {max_tokens} against {rate.limit_output_tokens} output tokens/min"
        return None

    def _message_outcome(self, reply: Reply, tool: str | None) -> Outcome:
        try:
            data = orjson.loads(reply.body)
            blocks = data["content"]
            stop = data.get("stop_reason")
            usage = _usage(data.get("usage"))
            if tool is None:
                text: str | None = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
            else:
                found = [b["input"] for b in blocks if b.get("type") == "tool_use" and b.get("name") == tool]
                text = orjson.dumps(found[0]).decode() if found else None
        except (ValueError, LookupError, TypeError, AttributeError):
            return self._malformed(reply)
        finish = _FINISH.get(stop, stop) if isinstance(stop, str) else None
        if stop == "refusal":
            return Outcome(
                OutcomeKind.BAD_ROW, status=reply.status, finish_reason=stop, usage=usage, error="refused by the model"
            )
        if text is None:
            if finish != "length":
                return self._malformed(reply)
            text = ""  # cut off before the tool call was complete; the engine sees finish_reason "length"
        return Outcome(OutcomeKind.OK, status=reply.status, text=text, finish_reason=finish, usage=usage)
