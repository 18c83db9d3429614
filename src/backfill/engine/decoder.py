"""The answer decoder: parse an answer, validate it against the schema, fit it to the output columns.

It returns a result or a reason; what happens to the row is the runner's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import jsonschema
import pyarrow as pa

from backfill.io import output_table
from backfill.store import CachedResponse


# What pyarrow raises for a value that does not fit its column's type.
MISFITS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError)


@dataclass(slots=True)
class Decoded:
    ok: bool
    answer: Any = None  # parsed object (schema), text, or embedding vector
    error: str | None = None


class AnswerDecoder:
    def __init__(self, schema: dict[str, Any] | None, answer_fields: Sequence[pa.Field]):
        self._validator = jsonschema.Draft202012Validator(schema) if schema else None
        self._fields = list(answer_fields)

    def decode(self, response: CachedResponse) -> Decoded:
        if response.embedding is not None:
            return Decoded(True, response.embedding)
        if self._validator is None:
            return Decoded(True, response.text)
        try:
            value = json.loads(response.text or "")
        except json.JSONDecodeError:
            return Decoded(False, error="invalid output: not JSON")
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "output"
            return Decoded(False, error=f"invalid output at {where}: {error.message}")
        return Decoded(True, value)

    def columns(self, answers: list[Any]) -> dict[str, pa.Array]:
        """The answer columns of a chunk (None for rows without an answer); raises when a value does not fit."""
        if self._validator is not None:
            table = output_table(answers, self._fields)
            return {f.name: table.column(f.name) for f in self._fields}
        f = self._fields[0]
        return {f.name: pa.array(answers, type=f.type)}

    def misfit(self, answer: Any) -> str | None:
        """Why one answer does not fit its output columns (a number beyond int64, say), or None."""
        structured = self._validator is not None and isinstance(answer, dict)
        for f in self._fields:
            try:
                if structured:
                    output_table([answer], [f])
                else:
                    pa.array([answer], type=f.type)
            except MISFITS:
                value = answer.get(f.name) if structured else answer
                return f"invalid output: {f.name} = {str(value)[:40]} does not fit the column's type {f.type}"
        return None
