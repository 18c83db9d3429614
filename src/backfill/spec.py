"""JobSpec: everything a job needs, as one pydantic model, from a TOML/YAML file, CLI flags or Python kwargs.

Checks that need no I/O happen here (types, ranges, a valid JSON Schema); checks that
read the input or the environment happen in `engine.plan`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backfill.errors import SpecError

class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    timeout_s: float = Field(60.0, gt=0)
    context_tokens: int | None = Field(
        None, gt=0, description="Tokens the model accepts (prompt + output); default: the built-in table, by model."
    )

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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

    def answer_fingerprint(self) -> str:
        """Hash of what decides the answers; part of the job id so a changed prompt is a new job."""
        t = self.task
        parts = [t.kind, t.provider, t.base_url, t.model, t.prompt, t.system, t.messages, t.params, t.schema_, t.schema_name]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def job_id(self, input_fingerprint: str) -> str:
        """Stable id: the same command over the same input resumes the same job."""
        parts = [self.answer_fingerprint(), input_fingerprint, self.input.id_column, self.output.path, self.output.columns, self.chunk_size]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


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


def from_options(
    *,
    job_file: str | Path | None = None,
    input: str | None = None,
    input_format: str | None = None,
    input_encoding: str | None = None,
    id_column: str | None = None,
    prompt: str | None = None,
    system: str | None = None,
    messages: list[dict[str, str]] | None = None,
    model: str | None = None,
    provider: str | None = None,
    base_url: str | None = None,
    api_key_env: str | None = None,
    kind: str | None = None,
    schema: Any = None,
    params: dict[str, Any] | None = None,
    output: str | None = None,
    output_format: str | None = None,
    if_exists: str | None = None,
    columns: list[str] | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    input_tpm: float | None = None,
    output_tpm: float | None = None,
    max_in_flight: int | None = None,
    max_attempts: int | None = None,
    budget_usd: float | None = None,
    allow_partial: bool | None = None,
    chunk_size: int | None = None,
    timeout_s: float | None = None,
    context_tokens: int | None = None,
    prices: dict[str, Any] | None = None,
) -> JobSpec:
    """The one way flags and keyword arguments become a JobSpec (a job file first, options on top)."""
    base = read_job_file(job_file) if job_file else {}
    if "task" in base and "schema" in base["task"]:
        base["task"]["schema"] = load_schema(base["task"]["schema"])
    flags: dict[str, Any] = {
        "input": {"path": input, "format": input_format, "encoding": input_encoding, "id_column": id_column},
        "task": {
            "kind": kind,
            "model": model,
            "provider": provider,
            "base_url": base_url,
            "api_key_env": api_key_env,
            "prompt": prompt,
            "system": system,
            "messages": messages,
            "schema": load_schema(schema),
            "params": params or None,
            "timeout_s": timeout_s,
            "context_tokens": context_tokens,
        },
        "output": {"path": output, "format": output_format, "if_exists": if_exists, "columns": columns or None},
        "limits": {"rpm": rpm, "tpm": tpm, "input_tpm": input_tpm, "output_tpm": output_tpm, "max_in_flight": max_in_flight},
        "retries": {"max_attempts": max_attempts},
        "budget": {"usd": budget_usd, "allow_partial": allow_partial},
        "chunk_size": chunk_size,
        "prices": prices,
    }
    data = merge(base, flags)
    for section in ("input", "output"):  # absolute, so `backfill resume` works from any directory
        path = data.get(section, {}).get("path")
        if path:
            data[section]["path"] = os.path.abspath(path)
    if "model" not in data.get("task", {}):
        raise SpecError("Job spec field 'task.model': no model given; pass --model or set task.model in the job file.")
    return build_spec(data)
