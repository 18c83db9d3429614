"""Plan: check a JobSpec against the real input and environment before anything is sent.

Everything that can fail before spending money fails here, with one sentence naming
what to fix: the input, the id column, the template against the columns and the first
rows, the model's price, the API key, the schema, the output location.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pyarrow as pa

from backfill.cost import Price, PriceTable, context_limit
from backfill.errors import BackfillError, SpecError
from backfill.io import Source, check_id_column, check_stdout_format, check_writable, is_stdio, open_source, output_fields
from backfill.prompt import PromptTemplate, check_columns, check_text_columns
from backfill.providers import get_provider
from backfill.providers.base import dumps
from backfill.request import Request
from backfill.spec import JobSpec
from backfill.store import Store

# What the sim and OpenAI count against tokens/min when a chat request sets no max_tokens.
UNSET_MAX_TOKENS_RESERVE = 4096


@dataclass
class Plan:
    """A checked job: the spec plus what was resolved from it. Holds the API key in memory only."""

    spec: JobSpec
    source: Source
    template: PromptTemplate
    prices: PriceTable
    price: Price | None
    api_key: str | None
    output_schema: pa.Schema
    id_column: str | None
    rows_total: int
    job_id: str
    input_fingerprint: str
    endpoint: str = "builtin"
    context_tokens: int | None = None  # prompt + output the model accepts; None when unknown

    @property
    def chunks_total(self) -> int:
        return -(-self.rows_total // self.spec.chunk_size)

    @property
    def is_embedding(self) -> bool:
        return self.spec.task.kind == "embedding"

    @property
    def id_name(self) -> str:
        return self.id_column or "row_id"

    @property
    def answer_fields(self) -> list[pa.Field]:
        schema = self.spec.task.schema_
        if schema is not None:
            return output_fields(schema)
        if self.is_embedding:
            return [pa.field("embedding", pa.list_(pa.float32()))]
        return [pa.field("output", pa.string())]

    @cached_property
    def _request_params(self) -> dict[str, Any]:
        """The parameters every request of the job carries (shared, never mutated)."""
        task = self.spec.task
        if self.is_embedding:
            return dict(task.params)
        return {**get_provider(task.provider).default_params, **task.params}

    @cached_property
    def _key_frame(self) -> tuple[str, str]:
        """The request key's JSON before and after the body: the job's provider, endpoint, model,
        parameters and schema are serialized once, not once per row. `request_key` is the definition."""
        task = self.spec.task
        head = f"[{_key_json(task.provider)},{_key_json(self.endpoint)},{_key_json(task.model)},"
        tail = f",{_key_json(self._request_params)},{_key_json(task.schema_)}]"
        return head, tail

    def build_request(self, row: dict[str, Any]) -> Request:
        """Render one row into its request; the request key hashes everything that affects the answer."""
        task = self.spec.task
        params = self._request_params
        if self.is_embedding:
            text = self.template.render_text(row)
            body: Any = text
            max_out = 0
            messages = None
        else:
            messages = self.template.render(row)
            body = messages
            max_out = int(params.get("max_tokens") or params.get("max_completion_tokens") or UNSET_MAX_TOKENS_RESERVE)
            text = None
        head, tail = self._key_frame
        return Request(
            key=hashlib.sha256(f"{head}{_key_json(body)}{tail}".encode()).hexdigest(),
            kind=task.kind,
            model=task.model,
            messages=messages,
            input=text,
            params=params,
            schema=task.schema_,
            schema_name=task.schema_name,
            max_output_tokens=max_out,
        )

    @property
    def mode_key(self) -> str:
        return mode_key(self.spec.task.provider, self.spec.task.base_url)

    @property
    def key_env(self) -> str | None:
        """The variable the API key comes from: the job's own, or the adapter's default."""
        return self.spec.task.api_key_env or get_provider(self.spec.task.provider).key_env

    def too_long(self, request: Request) -> str | None:
        """Why a request cannot fit the model's context, or None. A cheap bound (a token is at least one
        UTF-8 byte, a character at most four) spares counting tokens for rows far below the limit."""
        limit = self.context_tokens
        if limit is None:
            return None
        if request.messages is not None:
            chars = sum(len(m.get("content") or "") for m in request.messages if isinstance(m.get("content"), str))
            overhead = 3 * len(request.messages) + 3
        else:
            chars, overhead = len(request.input or ""), 0
        if 4 * chars + overhead + request.max_output_tokens <= limit:
            return None
        prompt = request.prompt_tokens
        if prompt + request.max_output_tokens <= limit:
            return None
        return (
            f"too long for the model: {prompt:,} prompt tokens + {request.max_output_tokens:,} output tokens"
            f" reserved exceed its context of {limit:,} tokens; shorten the row or lower --max-tokens"
        )

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        if self.price is None:
            return 0.0
        return self.price.cost(input_tokens, output_tokens, cached_tokens)


def _key_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def request_key(
    provider: str, endpoint: str, model: str, body: Any, params: dict[str, Any], schema: dict[str, Any] | None
) -> str:
    """The definition of a request key: everything that determines the answer. Two servers that speak
    one protocol (two vLLM hosts, two Azure deployments, a rehearsal and the real API) answer
    differently, so the endpoint (deployment included) is in it; the structured-output mode is not,
    since it is how the schema travels, not what is asked."""
    return hashlib.sha256(_key_json([provider, endpoint, model, body, params, schema]).encode()).hexdigest()


def mode_key(provider: str, base_url: str | None) -> str:
    """What a structured-output mode is remembered by, with the model: the adapter and its endpoint
    (one proxy may serve two protocols at one URL)."""
    return f"{provider}|{key_endpoint(provider, base_url)}"


def key_endpoint(provider: str, base_url: str | None) -> str:
    """The endpoint as the request key names it: the base URL without a trailing slash, the adapter's
    default one, or `builtin` for the simulator started in-process (its port changes every run)."""
    if base_url:
        return base_url.rstrip("/")
    return get_provider(provider).default_base_url or "builtin"


def make_plan(spec: JobSpec, data: Any = None, *, api_key: str | None = None, store: Store | None = None) -> Plan:
    """Check `spec` (and the in-memory `data`, when given instead of a path) and resolve it into a Plan.

    `api_key`, when given, is used instead of the one in the environment. `store`, when given, is
    the ledger: an existing output file that its job with this job id writes is this job's own.
    """
    task = spec.task
    if data is None and not spec.input.path:
        raise SpecError("Job spec field 'input.path': no input given; pass --input FILE or a frame.")
    source = open_source(
        data if data is not None else spec.input.path, format=spec.input.format, encoding=spec.input.encoding
    )
    if spec.input.id_column:
        check_id_column(source, spec.input.id_column)
    template = PromptTemplate(prompt=task.prompt, system=task.system, messages=task.messages)
    check_columns(template, source.columns)
    check_text_columns(template, source.schema)
    _check_output_columns(spec, source)
    prices = PriceTable.builtin().with_overrides({m: p.model_dump() for m, p in spec.prices.items()})
    price = prices.get(task.model)
    adapter = get_provider(task.provider)
    if task.kind == "embedding" and not adapter.supports_embeddings:
        raise SpecError(f"The {task.provider} provider has no embeddings endpoint; use kind = \"chat\" or another provider.")
    if task.schema_ is not None and not adapter.structured_modes:
        raise SpecError(f"The {task.provider} provider takes no output schema; drop --schema or use another provider.")
    _check_encodable(task.schema_, task.params)
    if price is None and adapter.needs_price(task.base_url):
        raise SpecError(
            f"Model '{task.model}' has no known price; check the name or add [prices.\"{task.model}\"]"
            " with input and output (USD per 1M tokens) to the job file."
        )
    api_key = api_key or _api_key(spec)
    fingerprint = source.fingerprint()
    job_id = spec.job_id(fingerprint)
    if is_stdio(spec.output.path):  # standard output: no file to check
        check_stdout_format(spec.output.format)
    elif spec.output.path:
        # An existing output may be this job's own (it succeeded, or stopped while assembling it).
        job = store.get_job(job_id) if store is not None else None
        check_writable(
            spec.output.path,
            spec.output.format,
            input_path=spec.input.path if data is None else None,
            if_exists=spec.output.if_exists,
            job_output=job.spec.get("output", {}).get("path") if job is not None else None,
        )
    rows_total = source.num_rows()
    plan = Plan(
        spec=spec,
        source=source,
        template=template,
        prices=prices,
        price=price,
        api_key=api_key,
        output_schema=pa.schema([]),
        id_column=spec.input.id_column,
        rows_total=rows_total if rows_total is not None else _count_rows(source),
        job_id=job_id,
        input_fingerprint=fingerprint,
        endpoint=key_endpoint(task.provider, task.base_url),
        context_tokens=context_limit(prices, task.model, task.context_tokens),
    )
    plan.output_schema = _output_schema(plan)
    _check_first_rows(plan)
    return plan


def _check_encodable(schema: dict[str, Any] | None, params: dict[str, Any]) -> None:
    """A schema or parameter that JSON cannot carry (an integer beyond 64 bits) fails here, not in every request."""
    try:
        dumps({"schema": schema, "params": params})
    except (TypeError, ValueError) as e:
        raise SpecError(f"The schema or parameters cannot be sent as JSON ({e}); write such bounds as floats (1e20) or drop them.") from None


def _api_key(spec: JobSpec) -> str | None:
    task = spec.task
    adapter = get_provider(task.provider)
    env = task.api_key_env or adapter.key_env
    key = os.environ.get(env) if env else None
    if key:
        return key
    if env is None or not adapter.needs_key_for(task.base_url):
        return None  # the simulator, and self-hosted OpenAI-compatible servers, usually take no key
    raise SpecError(
        f"The API key variable {env} is not set; export it, or name another one with --api-key-env."
    )


def _check_output_columns(spec: JobSpec, source: Source) -> None:
    missing = [c for c in spec.output.columns if c not in source.columns]
    if missing:
        raise SpecError(
            f"Job spec field 'output.columns': column(s) {', '.join(missing)} are not in the input"
            f" (it has {', '.join(source.columns)})."
        )


def _output_schema(plan: Plan) -> pa.Schema:
    src = plan.source.schema
    fields: list[pa.Field] = [src.field(plan.id_column) if plan.id_column else pa.field("row_id", pa.int64())]
    fields += [src.field(c) for c in plan.spec.output.columns if c != plan.id_column]
    fields += plan.answer_fields
    fields += [
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("input_tokens", pa.int64()),
        pa.field("output_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("cached", pa.bool_()),
    ]
    names = [f.name for f in fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(
            f"Output column(s) {', '.join(dupes)} would appear twice; rename the schema field or drop it from output.columns."
        )
    return pa.schema(fields)


def _check_first_rows(plan: Plan, n: int = 5) -> None:
    for i, row in enumerate(plan.source.head(n)):
        try:
            plan.build_request(row)
        except BackfillError as e:
            raise SpecError(f"The template fails on row {i}: {e}") from None


def _count_rows(source: Source) -> int:
    return sum(b.num_rows for b in source.batches(65536))
