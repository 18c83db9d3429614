"""JobSpec: everything a job needs, as one pydantic model, from a TOML/YAML file, CLI flags or Python kwargs.

Checks that need no I/O happen here (types, ranges, a valid JSON Schema); checks that
read the input or the environment happen in `engine.plan`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backfill.cost import PriceTable
from backfill.durations import parse_duration
from backfill.errors import SpecError
from backfill.options import MODEL, OPTIONS, Kind, Option, check_keywords

# An input or output path meaning standard input / output.
STDIO = "-"

# Keys of a request that backfill writes itself: in task.params they would run a different model,
# inject messages or multiply the answers behind the job's back (issue 13 item 2).
RESERVED_PARAMS: dict[str, str] = {
    "model": "task.model (--model)",
    "messages": "task.prompt / task.messages (--prompt)",
    "input": "the input table (--input) and task.prompt",
    "system": "task.system (--system)",
    "response_format": "task.schema (--schema)",
    "n": "one job per answer wanted (each row gets one answer)",
    "stream": "nothing (answers are read whole)",
    "tools": "task.schema (--schema) for structured output",
    "tool_choice": "task.schema (--schema) for structured output",
}
# Deeper than this, a schema is refused: validating or walking it could exhaust the stack.
MAX_SCHEMA_DEPTH = 32
# The longest a single request may take; beyond it timers overflow.
MAX_TIMEOUT_S = 86400.0


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InputSpec(_Part):
    path: str | None = Field(None, description="Parquet, CSV or JSONL file; omitted when a frame is given from Python.")
    format: Literal["parquet", "csv", "jsonl"] | None = None
    id_column: str | None = Field(None, description="Column holding the row id; default: the row's position.")
    encoding: str | None = Field(None, description="Text encoding of a CSV or JSONL input (e.g. latin-1); default UTF-8.")


class TaskSpec(_Part):
    kind: Literal["chat", "embedding"] = "chat"
    model: str
    provider: Literal["sim", "openai", "azure", "anthropic"] = "sim"
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="Name of the environment variable that holds the API key.")
    prompt: str | None = Field(None, description="User message template (Jinja2, sandboxed).")
    system: str | None = None
    messages: list[dict[str, str]] | None = Field(None, description="A full chat message list of templates.")
    params: dict[str, Any] = Field(default_factory=dict, description="temperature, max_tokens, seed, top_p, stop, ...")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="JSON Schema of the structured output.")
    schema_name: str = "output"
    timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S, description="Seconds per request (at most a day).")
    context_tokens: int | None = Field(
        None, gt=0, description="Tokens the model accepts (prompt + output); default: the built-in table, by model."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    @field_validator("params")
    @classmethod
    def _no_reserved_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in RESERVED_PARAMS:
                raise ValueError(f"'{key}' is set by backfill and cannot be a request parameter; use {RESERVED_PARAMS[key]} instead")
        return value

    @model_validator(mode="after")
    def _one_template(self) -> TaskSpec:
        if self.prompt is None and self.messages is None:
            raise ValueError("give a prompt template (--prompt) or a messages list")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give either a prompt or a messages list, not both")
        if self.kind == "embedding" and (self.messages is not None or self.system or self.schema_):
            raise ValueError("an embedding job takes a prompt only (no system, messages or schema)")
        return self

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        _check_schema_shape(value)
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as e:
            raise ValueError(f"the schema is not valid JSON Schema: {e.message}") from None
        if value.get("type") != "object" or not value.get("properties"):
            raise ValueError("the schema must describe an object with properties (they become output columns)")
        return value


class OutputSpec(_Part):
    path: str | None = Field(None, description="Output file; omitted when Python asks for a frame back.")
    format: Literal["parquet", "csv", "jsonl"] | None = None
    columns: list[str] = Field(default_factory=list, description="Input columns passed through to the output.")
    if_exists: Literal["fail", "replace", "append", "upsert"] = Field(
        "fail", description="When the output exists and is not this job's: fail, replace it, or (tables) append / upsert."
    )


class LimitsSpec(_Part):
    rpm: float | None = Field(None, gt=0, description="Requests per minute; learned from headers when omitted.")
    tpm: float | None = Field(None, gt=0, description="Tokens per minute (Anthropic: input + output).")
    input_tpm: float | None = Field(None, gt=0)
    output_tpm: float | None = Field(None, gt=0)
    max_in_flight: int = Field(256, ge=1)


class RetrySpec(_Part):
    max_attempts: int = Field(6, ge=1, description="Attempts per row for transient failures.")
    backoff_s: float = Field(0.5, ge=0, description="Base of the exponential backoff (full jitter).")
    backoff_max_s: float = Field(30.0, ge=0)
    invalid_output_attempts: int = Field(3, ge=1, description="Attempts when the answer does not match the schema.")


class BudgetSpec(_Part):
    usd: float | None = Field(None, gt=0, description="Spending never passes this.")
    allow_partial: bool = Field(False, description="Start even when the estimate exceeds the budget; stop at it.")


class PriceSpec(_Part):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)


class JobSpec(_Part):
    """One job: input → task → output, under limits, retries and a budget."""

    input: InputSpec = Field(default_factory=InputSpec)
    task: TaskSpec
    output: OutputSpec = Field(default_factory=OutputSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    retries: RetrySpec = Field(default_factory=RetrySpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    prices: dict[str, PriceSpec] = Field(default_factory=dict, description="Per-model price overrides (USD per 1M tokens).")
    chunk_size: int = Field(500, ge=1, description="Rows per chunk, the unit of commit.")
    owner: str = "local"

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        where = _non_finite(data)
        if where is not None:
            raise SpecError(f"Job spec field '{where}' is NaN or infinite; give a finite number.")
        return data

    def answer_fingerprint(self) -> str:
        """Hash of what decides the answers; part of the job id so a changed prompt is a new job."""
        t = self.task
        parts = [t.kind, t.provider, t.base_url, t.model, t.prompt, t.system, t.messages, t.params, t.schema_, t.schema_name]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def job_id(self, input_fingerprint: str) -> str:
        """Stable id: the same command over the same input resumes the same job."""
        parts = [self.answer_fingerprint(), input_fingerprint, self.input.id_column, self.output.path, self.output.columns, self.chunk_size]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _non_finite(data: Any) -> str | None:
    """The key path of the first NaN or infinite number in a nested structure (a spec as given), else None."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:  # iterative: a spec nested thousands deep must get its sentence, not a RecursionError
        where, value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "job"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
        todo.extend((f"{where}.{k}" if where else str(k), v) for k, v in items)
    return None


def _check_schema_shape(schema: dict[str, Any]) -> None:
    """Refuse a schema nested deeper than MAX_SCHEMA_DEPTH or whose local $refs form a cycle (never recurse forever)."""
    objects: list[dict[str, Any]] = []
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:  # iterative, so a deep schema cannot exhaust Python's stack here
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels; flatten it")
        if isinstance(node, dict):
            objects.append(node)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    _check_ref_cycles(schema, objects)


def _resolve_ref(schema: dict[str, Any], ref: str) -> Any:
    node: Any = schema
    for part in ref.removeprefix("#").strip("/").split("/") if ref.strip("#/") else ():
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _direct_refs(node: Any) -> list[str]:
    """The local $refs a schema node *is* (itself or through allOf/anyOf/oneOf), not those under properties or items."""
    if not isinstance(node, dict):
        return []
    found = [node["$ref"]] if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#") else []
    for key in ("allOf", "anyOf", "oneOf"):
        subs = node.get(key)
        found += [r for sub in subs for r in _direct_refs(sub)] if isinstance(subs, list) else []
    return found


def _check_ref_cycles(schema: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """A $ref cycle that no object or array breaks (`a` is `b`, `b` is `a`) can never be satisfied nor expanded.

    `objects` is every object in the schema, as _check_schema_shape collected them.
    """
    edges: dict[str, list[str]] = {}
    todo = [r for node in objects for r in _direct_refs(node)]
    while todo:
        ref = todo.pop()
        if ref not in edges:
            edges[ref] = _direct_refs(_resolve_ref(schema, ref))
            todo.extend(edges[ref])
    done: set[str] = set()
    for start in edges:  # depth-first with the path on a stack: a ref met again on its own path is a cycle
        path: list[str] = []
        stack: list[tuple[str, bool]] = [(start, False)]
        while stack:
            ref, leaving = stack.pop()
            if leaving:
                path.pop()
                done.add(ref)
                continue
            if ref in path:
                raise ValueError(f"the schema's $ref '{ref}' refers back to itself; a $ref cycle must pass through an object's properties or an array's items")
            if ref in done:
                continue
            path.append(ref)
            stack.append((ref, True))
            stack.extend((nxt, False) for nxt in edges[ref])


def _format_error(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "job"
    msg = first["msg"].removeprefix("Value error, ")
    return f"Job spec field '{where}': {msg}."


def build_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a nested dict (from a file, flags or kwargs) into a JobSpec, or raise SpecError naming the field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e)) from None


def load_schema(value: Any) -> dict[str, Any] | None:
    """A schema given as a dict, a path to a .json file, a JSON string, or a pydantic model class."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value.model_json_schema()
    text = str(value)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"The schema is not valid JSON ({e.msg} at line {e.lineno}).") from None
    path = Path(text)
    if not path.is_file():
        raise SpecError(f"Schema file {text} does not exist; pass a JSON Schema file or a pydantic model.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"Schema file {text} is not valid JSON ({e.msg} at line {e.lineno}).") from None


def read_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job file (TOML or YAML) into a nested dict; relative paths in it are relative to the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"Job file {path} does not exist.")
    try:
        if p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(p.read_text()) or {}
        else:
            data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"Job file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"Job file {path} must hold a table of settings.")
    base = p.parent
    for section, key in (("input", "path"), ("output", "path")):
        v = data.get(section, {}).get(key)
        if v and not Path(v).is_absolute():
            data[section][key] = str(base / v)
    task = data.get("task", {})
    if isinstance(task.get("schema"), str) and not task["schema"].lstrip().startswith("{"):
        s = Path(task["schema"])
        task["schema"] = str(s if s.is_absolute() else base / s)
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` (flags) onto `base` (a job file); None values do not override."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = merge({}, v)
        else:
            out[k] = v
    return out


def _to_spec_value(option: Option, value: Any) -> Any:
    """A keyword's or flag's value as the JobSpec holds it; None leaves the job file's value."""
    if option.kind is Kind.FLAG:
        return True if value else None
    if option.kind is Kind.LIST:
        items = [value] if isinstance(value, str) else list(value)
        if option.name == "columns":  # `--columns a,b` as well as `--columns a --columns b`
            items = [c.strip() for item in items for c in str(item).split(",") if c.strip()]
        return items or None
    if option.kind is Kind.DURATION:
        return parse_duration(value)
    if option.kind is Kind.SCHEMA:
        return load_schema(value)
    return value


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def from_options(**options: Any) -> JobSpec:
    """The one way flags and keyword arguments become a JobSpec (a job file first, options on top).

    The keywords are the options table's (`backfill.options`); an unknown one is a SpecError.
    """
    check_keywords(set(options))
    job_file = options.pop("job_file", None)
    base = read_job_file(job_file) if job_file else {}
    if "task" in base and "schema" in base["task"]:
        base["task"]["schema"] = load_schema(base["task"]["schema"])
    flags: dict[str, Any] = {}
    per_model: list[tuple[Option, Any]] = []
    for option in OPTIONS:  # the table's order: `params` before `max_tokens`, so a flag wins over the dict
        value = options.get(option.name)
        if option.path is None or value is None:
            continue
        value = _to_spec_value(option, value)
        if value is None:
            continue
        if MODEL in option.path:
            per_model.append((option, value))
        elif isinstance(value, dict):
            _put(flags, option.path, merge(_get(flags, option.path), value))
        else:
            _put(flags, option.path, value)
    data = merge(base, flags)
    for section in ("input", "output"):  # absolute, so `backfill resume` works from any directory
        path = data.get(section, {}).get("path")
        if path and path != STDIO:
            data[section]["path"] = os.path.abspath(path)
    model = data.get("task", {}).get("model")
    if model is None:
        raise SpecError("Job spec field 'task.model': no model given; pass --model or set task.model in the job file.")
    for option, value in per_model:
        _put(data, tuple(model if p == MODEL else p for p in option.path or ()), value)
    if per_model:
        _fill_price(data["prices"], model)
    return build_spec(data)


def _fill_price(prices: dict[str, Any], model: str) -> None:
    """`--price-input` alone keeps the table's output price (and the other way round)."""
    known = PriceTable.builtin().get(model)
    price = prices[model]
    for side in ("input", "output"):
        if side not in price and known is not None:
            price[side] = getattr(known, side)


def _get(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for part in path:
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data if isinstance(data, dict) else {}
