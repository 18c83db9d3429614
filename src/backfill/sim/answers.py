"""Deterministic answers: each is a pure function of the request body (and the length settings).

The seed is the request hash — a hash of the canonical JSON of the body (model, messages,
parameters, schema) — never shared random state, so a test can recompute any answer with
`chat_answer(body)` / `messages_answer(body)` and check that an output row belongs to its input row.
A text answer starts with `Answer to «<first 8 words of the last user message>»` followed by filler
words up to a lognormal length capped by max_tokens. A schema answer is a JSON object valid against
the schema, its strings taken from the last user message and its enums, numbers and booleans picked
by the seed (`pattern` is not honoured). The schema comes from `response_format` (`json_schema`, or
`json_object` with a `schema`), a forced tool, or — for `json_object` without one and for requests
without `response_format` — a system message whose first `{` starts a JSON object with `properties`,
as a model follows a schema written into its prompt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from backfill.tokens import count_text

ECHO_WORDS = 8
# Each is one cl100k token with its leading space, so filler adds exactly one token per word.
_FILLER = (
    "the of and to in is that for it as with was on be by at this are from or have an not they which one you"
    " were all we can her has there been if more when will would who so no data row table model answer value"
    " time result first new good some only also well just about into over after"
).split()
_CALIBRATION = " ".join(_FILLER * 20)
_MAX_DEPTH = 6  # deeper than this, optional parts are left out so recursive schemas terminate
_NULL_CHANCE = 0.25

Finish = Literal["stop", "length", "tool"]
_OPENAI_FINISH = {"stop": "stop", "length": "length", "tool": "tool_calls"}
_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use"}


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer, protocol-neutral. `text` is the content (JSON text for schema answers and tool calls)."""

    text: str
    output_tokens: int
    finish: Finish
    tool_name: str | None = None  # set when the answer is a tool/function call
    data: Any = None  # the parsed JSON value of a schema answer or tool call; None if truncated

    @property
    def openai_finish_reason(self) -> str:
        return _OPENAI_FINISH[self.finish]

    @property
    def anthropic_stop_reason(self) -> str:
        return _ANTHROPIC_STOP[self.finish]


@dataclass(frozen=True, slots=True)
class Lengths:
    """Lognormal distribution of text answer lengths, in output tokens."""

    mean: float = 64.0
    sigma: float = 0.5


def canonical_json(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def request_digest(body: Any) -> bytes:
    return hashlib.blake2b(canonical_json(body), digest_size=16).digest()


def request_hash(body: Any) -> str:
    """The request hash: hex of a hash of the canonical request body; the seed of its answer."""
    return request_digest(body).hex()


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def echo_of(text: str) -> str:
    return " ".join(text.split()[:ECHO_WORDS])


def chat_answer(body: dict[str, Any], lengths: Lengths = Lengths(), digest: bytes | None = None) -> Answer:
    """The answer to an OpenAI chat completions body."""
    digest = digest or request_digest(body)
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    model = str(body.get("model", ""))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    words = echo_of(last_user_text(body.get("messages") or []))
    tool = _openai_forced_tool(body)
    if tool is not None:
        name, schema = tool
        return _json_answer(schema_value(schema, rng, words), model, max_tokens, tool_name=name)
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        return _json_answer(schema_value(schema, rng, words), model, max_tokens)
    if kind == "json_object":
        given = fmt.get("schema")
        schema = given if isinstance(given, dict) else prompted_schema(body.get("messages") or [])
        value = {"answer": f"Answer to «{words}»"} if schema is None else schema_value(schema, rng, words)
        return _json_answer(value, model, max_tokens)
    if fmt is None:
        schema = prompted_schema(body.get("messages") or [])
        if schema is not None:
            return _json_answer(schema_value(schema, rng, words), model, max_tokens)
    return _text_answer(words, rng, model, max_tokens, lengths)


_DECODER = json.JSONDecoder()


def prompted_schema(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A JSON Schema written into a system message: the JSON object its first `{` starts, if that
    object has `properties`. Deliberately simple, so a test can tell what the answer follows."""
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "system":
            continue
        text = content_text(message.get("content"))
        start = text.find("{")
        if start < 0:
            continue
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("properties"), dict):
            return value
    return None


def messages_answer(body: dict[str, Any], lengths: Lengths = Lengths(), digest: bytes | None = None) -> Answer:
    """The answer to an Anthropic messages body."""
    digest = digest or request_digest(body)
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    model = str(body.get("model", ""))
    max_tokens = body.get("max_tokens")
    words = echo_of(last_user_text(body.get("messages") or []))
    tool = _anthropic_forced_tool(body)
    if tool is not None:
        name, schema = tool
        return _json_answer(schema_value(schema, rng, words), model, max_tokens, tool_name=name)
    fmt = body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return _json_answer(schema_value(fmt.get("schema") or {}, rng, words), model, max_tokens)
    return _text_answer(words, rng, model, max_tokens, lengths)


def _openai_forced_tool(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    tools = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto", "none"):
        return None
    wanted = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    for fn in tools:
        if wanted is None or fn.get("name") == wanted:
            return str(fn.get("name", "")), fn.get("parameters") or {}
    return None


def _anthropic_forced_tool(body: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if not tools or not isinstance(choice, dict) or choice.get("type") not in ("tool", "any"):
        return None
    wanted = choice.get("name") if choice.get("type") == "tool" else None
    for tool in tools:
        if wanted is None or tool.get("name") == wanted:
            return str(tool.get("name", "")), tool.get("input_schema") or {}
    return None


def _text_answer(words: str, rng: random.Random, model: str, max_tokens: int | None, lengths: Lengths) -> Answer:
    target = max(1, round(_lognormal(rng, lengths.mean, lengths.sigma)))
    capped = max_tokens is not None and target > max_tokens
    if capped:
        target = max_tokens
    prefix = f"Answer to «{words}»"
    prefix_tokens = count_text(prefix)
    raw_target = max(1, int(target / _tokenizer_ratio(model)))  # filler is sized in cl100k tokens
    if prefix_tokens >= raw_target:
        text = _cut_to_tokens(prefix, raw_target, "") if capped else prefix
    else:
        text = prefix + " " + " ".join(rng.choices(_FILLER, k=raw_target - prefix_tokens))
    return Answer(text, _capped_count(text, model, max_tokens), "length" if capped else "stop")


@functools.lru_cache(maxsize=256)
def _tokenizer_ratio(model: str) -> float:
    """How many of `model`'s counted tokens one cl100k token makes (1.0 for OpenAI models)."""
    return count_text(_CALIBRATION, model) / count_text(_CALIBRATION)


def _json_answer(value: Any, model: str, max_tokens: int | None, tool_name: str | None = None) -> Answer:
    text = json.dumps(value, ensure_ascii=False)
    tokens = count_text(text, model)
    if max_tokens is not None and tokens > max_tokens:
        return truncate(Answer(text, tokens, "stop", tool_name), model, keep=max_tokens / tokens)
    return Answer(text, tokens, "tool" if tool_name else "stop", tool_name, value)


def truncate(answer: Answer, model: str, keep: float = 0.5) -> Answer:
    """The answer cut to `keep` of its tokens, as when max_tokens runs out (finish "length")."""
    text = _cut_to_tokens(answer.text, math.floor(answer.output_tokens * keep), model)
    return Answer(text, count_text(text, model), "length", answer.tool_name, None)


def _cut_to_tokens(text: str, limit: int, model: str) -> str:
    """A prefix of `text` (cut in proportion, then trimmed) that counts at most `limit` tokens."""
    total = count_text(text, model)
    if total <= limit:
        return text
    cut = text[: len(text) * limit // max(1, total)]
    while cut and count_text(cut, model) > limit:
        cut = cut[:-1]
    return cut


def _capped_count(text: str, model: str, max_tokens: int | None) -> int:
    tokens = count_text(text, model)
    return tokens if max_tokens is None else min(tokens, max_tokens)


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    if sigma <= 0:
        return mean
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def embedding_vector(text: str, model: str, dim: int) -> list[float]:
    """A deterministic unit vector for one input string."""
    seed = hashlib.blake2b(f"{model}\0{dim}\0{text}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(seed, "big"))
    gauss = rng.gauss
    raw = [gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def schema_value(schema: dict[str, Any], rng: random.Random, words: str) -> Any:
    """A value valid against a JSON schema (as pydantic and the providers write them)."""
    return _SchemaFiller(schema, rng, words or "sim").value(schema, 0)


class _SchemaFiller:
    def __init__(self, root: dict[str, Any], rng: random.Random, words: str) -> None:
        self.root = root
        self.rng = rng
        self.words = words

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        seen = 0
        while "$ref" in schema and seen < 32:
            node: Any = self.root
            for part in schema["$ref"].lstrip("#").strip("/").split("/"):
                if part:
                    node = node[part.replace("~1", "/").replace("~0", "~")]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**node, **rest}
            seen += 1
        if schema.get("allOf"):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part)
                merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            if not merged["properties"]:
                del merged["properties"]
            if not merged["required"]:
                del merged["required"]
            schema = merged
        return schema

    def value(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict):  # `true` / `false` schemas
            return self.words
        schema = self.resolve(schema)
        rng = self.rng
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [self.resolve(o) for o in schema[key]]
                non_null = [o for o in options if o.get("type") != "null"]
                if non_null and (len(non_null) == len(options) or depth < _MAX_DEPTH and rng.random() >= _NULL_CHANCE):
                    return self.value(rng.choice(non_null), depth)
                return None
        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            if not non_null or (len(non_null) < len(kind) and (depth >= _MAX_DEPTH or rng.random() < _NULL_CHANCE)):
                return None
            kind = rng.choice(non_null)
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        fill = {
            "object": self._object,
            "array": self._array,
            "integer": self._integer,
            "number": self._number,
            "boolean": self._boolean,
            "null": self._null,
        }.get(kind, self._string)
        return fill(schema, depth)

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        required = set(schema.get("required", ()))
        out: dict[str, Any] = {}
        props = schema.get("properties") or {}
        for name, sub in props.items():
            if name in required or (depth < _MAX_DEPTH and self.rng.random() < 0.5):
                out[name] = self.value(sub, depth + 1)
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict) and depth < _MAX_DEPTH:
            out["key"] = self.value(extra, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = [self.value(s, depth + 1) for s in schema.get("prefixItems", ())]
        low = max(int(schema.get("minItems", 1 if depth < _MAX_DEPTH else 0)), len(prefix))
        high = int(schema.get("maxItems", low + 2))
        count = low if depth >= _MAX_DEPTH else self.rng.randint(low, max(low, high))
        items = schema.get("items", {})
        if items is False:
            return prefix
        out = prefix
        seen: set[str] = set()
        for _ in range(count * 4 if schema.get("uniqueItems") else count - len(prefix)):
            if len(out) >= count:
                break
            item = self.value(items, depth + 1)
            if schema.get("uniqueItems"):
                mark = json.dumps(item, sort_keys=True)
                if mark in seen:
                    continue
                seen.add(mark)
            out.append(item)
        return out

    def _string(self, schema: dict[str, Any], depth: int) -> str:
        fmt = schema.get("format")
        n = self.rng.getrandbits(32)
        if fmt == "date-time":
            text = f"2024-{n % 12 + 1:02d}-{n % 28 + 1:02d}T{n % 24:02d}:{n % 60:02d}:00Z"
        elif fmt == "date":
            text = f"2024-{n % 12 + 1:02d}-{n % 28 + 1:02d}"
        elif fmt == "time":
            text = f"{n % 24:02d}:{n % 60:02d}:00"
        elif fmt == "email":
            text = f"user{n % 1000}@example.com"
        elif fmt in ("uri", "url"):
            text = f"https://example.com/{n % 1000}"
        elif fmt == "uuid":
            text = f"{n:08x}-{n % 65536:04x}-4{n % 4096:03x}-8{n % 4096:03x}-{n:08x}{n % 65536:04x}"
        else:
            text = self.words
        max_len = schema.get("maxLength")
        if max_len is not None:
            text = text[:max_len]
        min_len = schema.get("minLength", 0)
        return text + "x" * (min_len - len(text)) if len(text) < min_len else text

    def _integer(self, schema: dict[str, Any], depth: int) -> int:
        low, high = self._bounds(schema)
        low_i, high_i = math.ceil(low), math.floor(high)
        if "exclusiveMinimum" in schema and low_i <= schema["exclusiveMinimum"]:
            low_i += 1
        if "exclusiveMaximum" in schema and high_i >= schema["exclusiveMaximum"]:
            high_i -= 1
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            k_low, k_high = math.ceil(low_i / step), math.floor(high_i / step)
            return step * self.rng.randint(k_low, max(k_low, k_high))
        return self.rng.randint(low_i, max(low_i, high_i))

    def _number(self, schema: dict[str, Any], depth: int) -> float:
        low, high = self._bounds(schema)
        value = round(self.rng.uniform(low, high), 2)
        ok_low = value > low if "exclusiveMinimum" in schema else value >= low
        ok_high = value < high if "exclusiveMaximum" in schema else value <= high
        return value if ok_low and ok_high else (low + high) / 2

    def _bounds(self, schema: dict[str, Any]) -> tuple[float, float]:
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if low is None and high is None:
            return 0.0, 100.0
        if low is None:
            return high - 100.0, high
        if high is None:
            return low, low + 100.0
        return low, high

    def _boolean(self, schema: dict[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, schema: dict[str, Any], depth: int) -> None:
        return None
