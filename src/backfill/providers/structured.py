"""Structured-output modes: how a schema is asked for, how a server's refusal of one is recognised,
and the per-adapter state that moves to the next mode once, however many requests were refused."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from backfill.request import Outcome

_FIELD = "response_format"
# Servers refuse a response_format they do not support with 400 (OpenAI, llama.cpp), 422 (FastAPI
# validation: vLLM, many proxies) or 500 (some servers raise inside validation).
REJECT_STATUSES = frozenset({400, 422, 500})


class StructuredMode(str, enum.Enum):
    """One way to ask a server for JSON that follows a schema, from the strictest to the loosest."""

    JSON_SCHEMA = "json_schema"  # response_format {"type": "json_schema", "json_schema": {...}}
    JSON_OBJECT_SCHEMA = "json_object_schema"  # response_format {"type": "json_object", "schema": {...}}
    JSON_OBJECT = "json_object"  # response_format {"type": "json_object"}, the schema in a system message
    PROMPT = "prompt"  # no response_format; the schema and instructions in a system message
    TOOL = "tool"  # Anthropic: one forced tool whose input schema is the schema

    def __str__(self) -> str:
        return self.value

    @property
    def sends_response_format(self) -> bool:
        return self in (StructuredMode.JSON_SCHEMA, StructuredMode.JSON_OBJECT_SCHEMA, StructuredMode.JSON_OBJECT)

    @property
    def instructs(self) -> bool:
        """Whether the schema travels in the messages (the server does not enforce it)."""
        return self in (StructuredMode.JSON_OBJECT, StructuredMode.PROMPT)


def rejects_response_format(status: int, body: bytes) -> bool:
    """Whether an error reply is the server refusing the structured-output parameter.

    Read from the body's structure where it has one: OpenAI's `error.param`, FastAPI's
    `detail[*].loc`. Only a body that names no parameter (a null or missing `param`, llama.cpp,
    Ollama, plain text) is judged by whether its message names `response_format`."""
    if status not in REJECT_STATUSES:
        return False
    try:
        data = orjson.loads(body)
    except ValueError:
        return _FIELD in body.decode("utf-8", "replace")
    if not isinstance(data, dict):
        return False
    detail = data.get("detail")
    if isinstance(detail, list):
        return any(isinstance(d, dict) and isinstance(d.get("loc"), list) and _FIELD in d["loc"] for d in detail)
    if isinstance(detail, str):
        return _FIELD in detail
    err = data.get("error", data)
    if isinstance(err, str):
        return _FIELD in err
    if not isinstance(err, dict):
        return False
    param = err.get("param")
    if isinstance(param, str):
        return param == _FIELD or param.startswith(_FIELD + ".")
    message = err.get("message")
    return isinstance(message, str) and _FIELD in message


def schema_instruction(schema: dict[str, Any]) -> str:
    """The system text that carries a schema when the server does not enforce it.

    The schema is the first `{` of the text, so the simulator (and a reader) can find it."""
    return (
        orjson.dumps(schema).decode()
        + "\n\nAnswer with one JSON object that matches the JSON Schema above and nothing else:"
        " no prose, no code fences."
    )


def with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """The messages with the instruction leading the system message (merged into a leading text
    system message, since some chat templates refuse a second one)."""
    first = messages[0] if messages else None
    if first is not None and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": f"{instruction}\n\n{first['content']}"}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def unfenced(text: str) -> str:
    """A prompted answer without the ```json fence models like to wrap it in."""
    stripped = text.strip()
    if not stripped.startswith("```"):
        return text
    body = stripped[stripped.find("\n") + 1 :] if "\n" in stripped else stripped[3:]
    return body[: body.rfind("```")].strip() if body.rstrip().endswith("```") else body.strip()


class ModeState:
    """An adapter's current structured-output mode, shared by all its requests in flight.

    Until a mode has been seen to work, one request at a time goes out (the probe) and the rest wait
    for it, so a server that refuses the mode refuses one request, not every request in flight. A
    refusal moves on only from the mode that request was sent with, so refusals that cross under the
    same old mode advance it once."""

    def __init__(self, modes: tuple[StructuredMode, ...]) -> None:
        self.modes = modes
        self.current: StructuredMode | None = modes[0] if modes else None
        self.confirmed = False  # a request in the current mode was answered
        self.exhausted = False  # the last mode was refused too
        self._probe: asyncio.Event | None = None

    def restore(self, mode: StructuredMode | str) -> None:
        try:
            wanted = StructuredMode(mode)
        except ValueError:
            wanted = None
        if wanted is None or wanted not in self.modes:
            known = ", ".join(m.value for m in self.modes) or "none"
            raise ValueError(f"Structured-output mode {mode!r} is not one of this adapter's ({known}).")
        self.current, self.confirmed, self.exhausted = wanted, False, False

    def confirm(self, mode: StructuredMode) -> None:
        if mode is self.current:
            self.confirmed = True

    def advance(self, refused: StructuredMode) -> StructuredMode | None:
        """The mode to re-send in after `refused` was refused; None when no mode is left."""
        if self.current is not refused:
            return None if self.exhausted else self.current  # another request already moved on
        i = self.modes.index(refused)
        if i + 1 == len(self.modes):
            self.exhausted = True
            return None
        self.current, self.confirmed = self.modes[i + 1], False
        return self.current

    async def send(self, attempt: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Run `attempt`, alone while no mode has been seen to work."""
        if self.confirmed or self.exhausted:
            return await attempt()
        while (gate := self._probe) is not None:
            await gate.wait()
            if self.confirmed or self.exhausted:
                return await attempt()
        self._probe = gate = asyncio.Event()
        try:
            return await attempt()
        finally:
            self._probe = None
            gate.set()
