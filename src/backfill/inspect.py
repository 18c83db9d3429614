"""`backfill requests JOB [ROW_ID]`: what was sent for a row and what came back, the way `llm logs` shows it.

The request is rendered again from the job's stored spec and its input (the ledger keeps answers, not
requests); the answer is the one the ledger cached under the request key. Secrets are never shown.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import typer

from backfill import engine
from backfill.cost import PriceTable
from backfill.engine.plan import Plan, key_endpoint
from backfill.errors import BackfillError
from backfill.io import open_source
from backfill.prompt import PromptTemplate
from backfill.providers import get_provider
from backfill.providers.base import without_userinfo
from backfill.spec import build_spec
from backfill.store import CachedResponse, JobRecord, Store

# Vector values shown in text; --json shows them all.
_SHOWN_VALUES = 8


class RowState(str, enum.Enum):
    ANSWERED = "answered"  # an answer is cached under the row's request key
    DEAD_LETTER = "dead_letter"  # the row's committed output is its dead letter
    NOT_ANSWERED = "not_answered"  # no answer yet (or the cache was cleared since)


@dataclass
class RowRequest:
    """One row: the request it becomes and what the ledger holds for it."""

    row_id: Any
    chunk: int
    state: RowState
    request_key: str | None  # None when the template fails on the row
    request: dict[str, Any] | None
    answer: CachedResponse | None
    error: str | None  # the dead letter's reason, or the template's failure


def render_plan(record: JobRecord) -> Plan:
    """A plan that renders the job's requests exactly as its runs did, from the stored spec and the input.

    It holds no API key and checks nothing beyond what rendering needs: inspecting a job sends nothing."""
    spec = build_spec(record.spec)
    path = spec.input.path
    if not path:
        raise BackfillError(
            f"Job {record.id} read a frame from Python, which the ledger does not keep, so its requests cannot be re-rendered."
        )
    source = open_source(path, format=spec.input.format, encoding=spec.input.encoding)
    if source.fingerprint() != record.input_fingerprint:
        raise BackfillError(
            f"The input '{path}' changed since job {record.id} ran, so its requests cannot be re-rendered from it;"
            " restore the input as it was."
        )
    task = spec.task
    return Plan(
        spec=spec,
        source=source,
        template=PromptTemplate(prompt=task.prompt, system=task.system, messages=task.messages),
        prices=PriceTable.builtin(),
        price=None,
        api_key=None,
        output_schema=pa.schema([]),
        id_column=spec.input.id_column,
        rows_total=record.rows_total or 0,
        job_id=record.id,
        input_fingerprint=record.input_fingerprint,
        endpoint=key_endpoint(task.provider, task.base_url),
    )


def _rows(plan: Plan, row_id: str | None, limit: int) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """(chunk index, row id, row) of the row with `row_id`, or of the first `limit` rows."""
    size = plan.spec.chunk_size
    shown = 0
    for index, batch in enumerate(plan.source.batches(size)):
        if plan.id_column:
            ids = batch.column(plan.id_column).to_pylist()
        else:
            ids = list(range(index * size, index * size + batch.num_rows))
        for pos, rid in enumerate(ids):
            if row_id is not None and str(rid) != row_id:
                continue
            yield index, rid, batch.slice(pos, 1).to_pylist()[0]
            shown += 1
            if row_id is not None or shown >= limit:
                return


def _shown_request(plan: Plan, request: Any, mode: str | None) -> dict[str, Any]:
    """The request as backfill built it, fit to show: the endpoint without credentials, no headers."""
    task = plan.spec.task
    shown: dict[str, Any] = {
        "provider": task.provider,
        "endpoint": without_userinfo(plan.endpoint),
        "model": request.model,
        "kind": request.kind,
    }
    if request.messages is not None:
        shown["messages"] = request.messages
    else:
        shown["input"] = request.input
    shown["params"] = request.params
    if request.schema is not None:
        shown["schema_name"] = request.schema_name
        shown["schema"] = request.schema
        shown["structured_mode"] = mode
    return shown


def job_requests(store: Store, job: str, row_id: str | None = None, limit: int = 5) -> tuple[JobRecord, list[RowRequest]]:
    """The job (a unique id prefix is enough) and, for the row `row_id` or the first `limit` rows, what was sent and
    what came back."""
    record = store.find_job(job)
    plan = render_plan(record)
    task = plan.spec.task
    mode = None
    if task.schema_ is not None:
        # What the runs used: the mode the ledger remembers for this endpoint and model, else the adapter's first.
        mode = store.get_structured_mode(plan.mode_key, task.model) or get_provider(task.provider).structured_modes[0].value
    done = store.done_chunks(record.id)
    built: list[tuple[int, Any, Any, str | None]] = []
    for chunk, rid, row in _rows(plan, row_id, limit):
        try:
            built.append((chunk, rid, plan.build_request(row), None))
        except BackfillError as e:
            built.append((chunk, rid, None, f"template: {e}"))
    if not built:
        what = f"column '{plan.id_column}'" if plan.id_column else "the row's position, from 0"
        raise BackfillError(f"Job {record.id} has no row with id '{row_id}'; its row ids are {what}.")
    cached = store.get_responses([r.key for _, _, r, _ in built if r is not None])
    dead = {d.row_id: d.reason for c in sorted({c for c, *_ in built} & done) for d in store.chunk_dead_letters(record.id, c)}
    out: list[RowRequest] = []
    for chunk, rid, request, failed in built:
        hit = cached.get(request.key) if request is not None else None
        reason = dead.get(str(rid)) if chunk in done else None
        if reason is not None:
            state = RowState.DEAD_LETTER
        elif hit is not None:
            state = RowState.ANSWERED
        else:
            state = RowState.NOT_ANSWERED
        out.append(RowRequest(
            row_id=rid, chunk=chunk, state=state,
            request_key=request.key if request is not None else None,
            request=_shown_request(plan, request, mode) if request is not None else None,
            answer=hit,
            error=reason or failed,
        ))
    return record, out


def _as_json(record: JobRecord, rows: list[RowRequest]) -> str:
    return json.dumps({"job_id": record.id, "requests": [asdict(r) for r in rows]}, ensure_ascii=False, default=str)


def _as_text(record: JobRecord, rows: list[RowRequest]) -> str:
    lines: list[str] = []
    for r in rows:
        lines.append(f"job {record.id}  row {r.row_id}  (chunk {r.chunk})  {r.state.value.replace('_', ' ')}")
        if r.request is not None:
            req = r.request
            lines.append(f"  request key {r.request_key}")
            where = "the built-in simulator" if req["endpoint"] == "builtin" else req["endpoint"]
            via = f"  sent to {req['provider']} model {req['model']} at {where}"
            if req.get("structured_mode"):
                via += f", structured output as {req['structured_mode']}"
            lines.append(via)
            if req["params"]:
                lines.append(f"  params {json.dumps(req['params'], ensure_ascii=False, default=str)}")
            if "schema" in req:
                lines.append(f"  schema {req['schema_name']}: {json.dumps(req['schema'], ensure_ascii=False)}")
            for m in req.get("messages") or []:
                lines.append(f"  {m.get('role')}: {_indent(str(m.get('content')))}")
            if "input" in req:
                lines.append(f"  input: {_indent(str(req['input']))}")
        if r.answer is not None:
            a = r.answer
            lines.append(f"  answer ({a.input_tokens:,} tokens in, {a.output_tokens:,} out, ${a.cost_usd:.6f}):")
            if a.embedding is not None:
                head = ", ".join(f"{v:.4f}" for v in a.embedding[:_SHOWN_VALUES])
                more = ", ..." if len(a.embedding) > _SHOWN_VALUES else ""
                lines.append(f"    embedding of {len(a.embedding)} values [{head}{more}]")
            else:
                lines.append(f"    {_indent(a.text or '', 4)}")
        if r.error is not None:
            lines.append(f"  {'dead letter' if r.state is RowState.DEAD_LETTER else 'error'}: {r.error}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _indent(text: str, by: int = 4) -> str:
    return text.replace("\n", "\n" + " " * by)


def requests_command(
    job: str = typer.Argument(..., help="Job id (a unique prefix is enough).", show_default=False),
    row_id: Optional[str] = typer.Argument(
        None, help="The row's id: its id column's value, or its position from 0.", show_default="the first rows"
    ),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", help="Where the ledger lives.", show_default="./.backfill", envvar="BACKFILL_STATE_DIR"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: the job id and a list of requests."),
    limit: int = typer.Option(5, "--limit", min=1, help="Rows shown when no row id is given.", show_default=True),
) -> None:
    """What was sent for a row and what came back: the request re-rendered from the job's spec and input, and the cached answer."""
    store = engine.open_store(state_dir)
    try:
        record, rows = job_requests(store, job, row_id, limit)
    finally:
        store.close()
    typer.echo(_as_json(record, rows) if as_json else _as_text(record, rows))
