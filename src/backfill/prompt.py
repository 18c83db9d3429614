"""Prompt templates: render a row into chat messages with a sandboxed Jinja2 engine.

A user's template sees the row's values and nothing else: no Python attributes, no
mutation, no huge repetitions. Templates compile once; rendering is on the per-row path.
Binary values are refused, never rendered as their Python form (b'...').
"""

from __future__ import annotations

import difflib
import json
import operator
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jinja2
import pyarrow as pa
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backfill.errors import BackfillError, SpecError

ROLES = ("system", "developer", "user", "assistant")
# The whole row as one mapping, for columns whose names are not identifiers ({{ row["first name"] }}).
ROW_VARIABLE = "row"
# Caps on what one expression may build; a prompt needs nothing near these.
_MAX_REPEAT = 1_000_000
_MAX_EXPONENT = 1_000


class PromptError(BackfillError):
    """A template failed on one row; the engine dead-letters that row."""


_BINARY = (bytes, bytearray, memoryview)


def _binary_message(column: str | None) -> str:
    what = f"Column '{column}' holds" if column is not None else "A value the template renders holds"
    return f"{what} binary data, not text; convert it to a text column (decode its bytes) before using it in the prompt."


def _json_default(value: Any) -> Any:
    if isinstance(value, _BINARY):
        raise PromptError(_binary_message(None))
    if isinstance(value, _TextRow):
        return dict(value)
    return str(value)  # dates, decimals: their text


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _finalize(value: Any) -> Any:
    if value is None:
        return ""  # a null cell renders as nothing, not "None"
    if isinstance(value, _BINARY):
        raise PromptError(_binary_message(None))
    return value


class _TextRow(Mapping[str, Any]):
    """The row as `row[...]` sees it: a binary value is an error naming its column."""

    __slots__ = ("_row",)

    def __init__(self, row: Mapping[str, Any]):
        self._row = row

    def __getitem__(self, key: str) -> Any:
        value = self._row[key]
        if isinstance(value, _BINARY):
            raise PromptError(_binary_message(key))
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def __repr__(self) -> str:
        return repr(dict(self))


class _Environment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus limits on `*` and `**` so one expression cannot exhaust memory or CPU."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > _MAX_EXPONENT:
                raise SecurityError(f"the exponent {right} is too large")
            return operator.pow(left, right)
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                raise SecurityError("the repeated value would be too large")
        return operator.mul(left, right)


def _environment() -> _Environment:
    env = _Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson  # Jinja's own escapes <, > and & for HTML
    del env.globals["lipsum"]  # generates text of any requested size
    return env


_ENV = _environment()


# A template that only puts columns between plain text, as (is a column name, text) parts.
_Parts = tuple[tuple[bool, str], ...]
_MISSING = object()


def _compile(source: str, where: str) -> tuple[jinja2.Template, _Parts | None, frozenset[str], frozenset[str]]:
    """The template, its plain parts (if any), the variables it uses and the columns it names as row[...]."""
    try:
        ast = _ENV.parse(source)
        template = _ENV.from_string(ast)
    except jinja2.TemplateSyntaxError as e:
        raise SpecError(f"The {where} template has a syntax error on line {e.lineno}: {e.message}.") from None
    return template, _substitution_parts(ast), frozenset(meta.find_undeclared_variables(ast)), _row_keys(ast)


def _row_keys(ast: nodes.Template) -> frozenset[str]:
    """Columns reached by a constant name through the row variable: row["first name"], row.text."""
    keys: set[str] = set()
    for node in ast.find_all((nodes.Getitem, nodes.Getattr)):
        if not (isinstance(node.node, nodes.Name) and node.node.name == ROW_VARIABLE):
            continue
        if isinstance(node, nodes.Getattr):
            keys.add(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            keys.add(node.arg.value)
    return frozenset(keys)


def _substitution_parts(ast: nodes.Template) -> _Parts | None:
    """The parts of a template made only of text and `{{ column }}`, the common case, which is then
    rendered by joining strings: Jinja's per-render context is a fair share of a request's CPU."""
    parts: list[tuple[bool, str]] = []
    for output in ast.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append((False, node.data))
            elif isinstance(node, nodes.Name) and node.ctx == "load":
                parts.append((True, node.name))
            else:
                return None
    return tuple(parts)


def _substitute(parts: _Parts, row: Mapping[str, Any]) -> str | None:
    """Render as Jinja would (a null is empty text, other values `str`); None when a name is not in the row."""
    out: list[str] = []
    for is_name, text in parts:
        if not is_name:
            out.append(text)
            continue
        value = row[text] if text in row else (row if text == ROW_VARIABLE else _MISSING)
        if value is _MISSING:
            return None
        if isinstance(value, str):
            out.append(value)
        elif value is None:
            out.append("")
        elif isinstance(value, _BINARY):
            raise PromptError(_binary_message(text))
        else:
            out.append(str(value))
    return "".join(out)



class PromptTemplate:
    """Either `prompt` (the user message, with an optional `system` message) or a full `messages` list.

    Every message content is a template over the row's columns; a column can also be
    reached as row["name"]. Null values render as empty text.
    """

    def __init__(
        self,
        *,
        prompt: str | None = None,
        system: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ):
        if (prompt is None) == (messages is None):
            raise SpecError("Give either a prompt or a messages list, not both and not neither.")
        if messages is not None and system is not None:
            raise SpecError("A system prompt goes inside the messages list when messages are given.")
        if prompt is not None:
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": prompt}
            ]
            names = (["system"] if system is not None else []) + ["prompt"]
        else:
            assert messages is not None
            if not messages:
                raise SpecError("The messages list is empty; give at least one user message.")
            names = [f"messages[{i}]" for i in range(len(messages))]
        self._messages: list[tuple[str, jinja2.Template, _Parts | None]] = []
        variables: set[str] = set()
        row_keys: set[str] = set()
        for name, message in zip(names, messages, strict=True):
            role, content = _check_message(message, name)
            template, parts, used, keys = _compile(content, name)
            self._messages.append((role, template, parts))
            variables |= used
            row_keys |= keys
        self._user = [(t, parts) for role, t, parts in self._messages if role == "user"]
        if not self._user:
            raise SpecError("The messages list has no user message; add one.")
        variables.discard(ROW_VARIABLE)
        self.variables: frozenset[str] = frozenset(variables)
        # Every column the template names, directly or as row[...]; what must hold text.
        self.columns_used: frozenset[str] = self.variables | row_keys

    def _context(self, row: Mapping[str, Any]) -> dict[str, Any]:
        # A filter turns bytes into "b'...'" before finalize could see them: refuse them first.
        for name in self.variables:
            if isinstance(row.get(name), _BINARY):
                raise PromptError(_binary_message(name))
        context = dict(row)
        context.setdefault(ROW_VARIABLE, _TextRow(row))
        return context

    def _one(self, template: jinja2.Template, parts: _Parts | None, row: Mapping[str, Any]) -> str:
        if parts is not None:
            text = _substitute(parts, row)
            if text is not None:
                return text
        context = self._context(row)
        try:
            return template.render(context)
        except PromptError:
            raise
        except Exception as e:  # any failure inside a user's template is this row's problem
            raise PromptError(_row_error(e)) from None

    def render(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        """The row's chat messages; PromptError when the template fails on this row."""
        return [{"role": role, "content": self._one(t, parts, row)} for role, t, parts in self._messages]

    def render_text(self, row: Mapping[str, Any]) -> str:
        """The user prompt as one string (embedding jobs); several user messages are joined by a blank line."""
        return "\n\n".join(self._one(t, parts, row) for t, parts in self._user)


def _check_message(message: Any, name: str) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise SpecError(f"The {name} entry must be a mapping with 'role' and 'content'.")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise SpecError(f"The {name} role is {role!r}; use one of {', '.join(ROLES)}.")
    if not isinstance(content, str):
        raise SpecError(f"The {name} content must be a text template.")
    return role, content


def _row_error(e: Exception) -> str:
    detail = str(e).rstrip(".")
    if isinstance(e, SecurityError):
        return f"The template tried something the sandbox forbids ({detail})."
    if isinstance(e, jinja2.UndefinedError):
        return f"The template failed on this row: {detail}."
    return f"The template failed on this row ({type(e).__name__}: {detail})."


def check_columns(template: PromptTemplate, columns: Iterable[str]) -> None:
    """Raise SpecError naming each column the template uses that the input lacks."""
    available = list(columns)
    missing = sorted(template.variables - set(available))
    if not missing:
        return
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, available, n=1)
        if close:
            hints.append(f"'{name}' (did you mean '{close[0]}'?)")
        else:
            hints.append(f"'{name}'")
    raise SpecError(
        f"The prompt uses column(s) {', '.join(hints)} that the input does not have; "
        f"available columns: {', '.join(available) or '(none)'}."
    )


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_binary_view(t)


def check_text_columns(template: PromptTemplate, schema: pa.Schema) -> None:
    """Raise SpecError naming the first column the template uses that holds binary data."""
    for field in schema:
        if field.name in template.columns_used and _is_binary(field.type):
            raise SpecError(_binary_message(field.name))
