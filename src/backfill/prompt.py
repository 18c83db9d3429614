"""Prompt templates: render a row into chat messages with a sandboxed Jinja2 engine.

A user's template sees the row's values and nothing else: no Python attributes, no mutation, and a
budget per row (loop steps and calls, CPU time, characters built) enforced inside the sandbox.
Templates compile once; rendering is on the per-row path. Binary values are refused, never rendered
as their Python form (b'...').
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import operator
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jinja2
import pyarrow as pa
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter

from backfill.errors import BackfillError, SpecError

ROLES = ("system", "developer", "user", "assistant")
# The whole row as one mapping, for columns whose names are not identifiers ({{ row["first name"] }}).
ROW_VARIABLE = "row"
# Caps on what one expression may build; a prompt needs nothing near these.
_MAX_REPEAT = 1_000_000
_MAX_EXPONENT = 1_000
_MAX_INT_BITS = 100_000  # a prompt never needs a 30,000-digit number; bigger ones cost seconds to multiply
_CLOCK_EVERY = 1024  # steps between two reads of the CPU clock (a read costs about as much as 20 steps)


@dataclass(frozen=True)
class RenderBudget:
    """What rendering one row may use. A row over it is that row's dead letter."""

    steps: int = 250_000  # loop iterations, calls, filters and operators
    cpu_s: float = 0.25  # CPU time of the rendering thread
    chars: int = 8_000_000  # the largest text (or list) one step may build, and each message's length


DEFAULT_BUDGET = RenderBudget()


class PromptError(BackfillError):
    """A template failed on one row; the engine dead-letters that row."""


class RenderBudgetError(PromptError):
    """A template went over its render budget on one row (a runaway loop, a huge value); `limit` names the limit."""

    def __init__(self, limit: str):
        super().__init__(f"The template went over its render budget on this row ({limit}); simplify the template.")
        self.limit = limit


class _Meter:
    """One render's use of its budget; the sandbox's hooks charge it."""

    __slots__ = ("budget", "steps_left", "deadline", "until_clock")

    def __init__(self, budget: RenderBudget):
        self.budget = budget
        self.steps_left = budget.steps
        self.deadline = time.thread_time() + budget.cpu_s
        self.until_clock = _CLOCK_EVERY

    def step(self, n: int = 1) -> None:
        self.steps_left -= n
        if self.steps_left < 0:
            raise RenderBudgetError(f"more than {self.budget.steps:,} loop steps and calls")
        self.until_clock -= n
        if self.until_clock <= 0:
            self.until_clock = _CLOCK_EVERY
            if time.thread_time() > self.deadline:
                raise RenderBudgetError(f"more than {self.budget.cpu_s:g} s of CPU")

    def size(self, n: int) -> None:
        if n > self.budget.chars:
            raise RenderBudgetError(f"a value of more than {self.budget.chars:,} characters")


_METER: ContextVar[_Meter | None] = ContextVar("backfill_render_meter", default=None)


def _meter() -> _Meter:
    meter = _METER.get()
    if meter is None:  # a render outside PromptTemplate (none in backfill): it still gets a budget
        meter = _Meter(DEFAULT_BUDGET)
        _METER.set(meter)
    return meter


def _check_result(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict, set, frozenset)):
        _meter().size(len(value))
    elif isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise RenderBudgetError(f"a number of more than {_MAX_INT_BITS:,} bits")
    return value


def _check_widths(widths: Iterable[str]) -> None:
    """Refuse a format width or precision larger than the budget: it would allocate that much at once."""
    meter = _meter()
    for w in widths:
        if w and w.isdigit():
            meter.size(int(w) if len(w) < 12 else meter.budget.chars + 1)


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?")
_FORMAT_NUMBER = re.compile(r"\d+")


def _check_printf(fmt: str, args: Any) -> None:
    """`fmt % args`: widths and precisions, also those given as `*` in the arguments."""
    star = False
    for width, precision in _PRINTF_SPEC.findall(fmt):
        _check_widths((width, precision))
        star = star or "*" in (width, precision)
    if star:
        for a in args if isinstance(args, tuple) else (args,):
            if isinstance(a, int):
                _meter().size(abs(a))


# Filters and str methods whose number arguments are widths of the text they build.
_WIDTH_TAKERS = frozenset({"center", "ljust", "rjust", "zfill", "indent", "wordwrap"})


def _check_int_args(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """A width larger than the budget (center(10**9), indent(10**9)) would allocate that much at once."""
    if name not in _WIDTH_TAKERS:
        return
    meter = _meter()
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and a > meter.budget.chars:
            meter.size(a)


def _text_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(len(v) if isinstance(v, str) else 8 for v in value) + len(value)
    return 8


def _check_growth(name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Bound what a call that multiplies its input builds before it builds it: replace, join, wordwrap, indent, expandtabs."""
    meter = _meter()
    if name == "replace" and isinstance(value, str) and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        if len(new) > len(old):
            meter.size(len(value) + (value.count(old) if old else len(value) + 1) * (len(new) - len(old)))
    elif name == "join":
        sep = args[0] if args and isinstance(args[0], str) else kwargs.get("d", "")
        if isinstance(sep, str) and isinstance(value, (list, tuple, str)):
            meter.size(_text_len(value) + len(value) * len(sep))
    elif name == "wordwrap" and isinstance(value, str):
        wrap = kwargs.get("wrapstring", args[2] if len(args) > 2 else None)
        if isinstance(wrap, str):
            meter.size(len(value) * (len(wrap) + 1))
    elif name == "indent" and isinstance(value, str):
        width = kwargs.get("width", args[0] if args else 4)
        size = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        meter.size(len(value) + (value.count("\n") + 1) * size)
    elif name == "expandtabs" and isinstance(value, str):
        tab = kwargs.get("tabsize", args[0] if args else 8)
        if isinstance(tab, int):
            meter.size(len(value) + value.count("\t") * tab)


def _join_items(items: Any) -> Any:
    """What a join will join, as a list when it is an iterator (so its length is known before joining),
    taking no more items than the budget's characters: a longer list is over budget anyway."""
    if isinstance(items, (str, list, tuple)) or not isinstance(items, Iterable):
        return items
    meter = _meter()
    out = list(itertools.islice(items, meter.budget.chars + 1))
    meter.size(len(out))
    return out


def _guarded(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter under the budget; the attributes Jinja reads (pass_context...) are kept."""
    takes_first = getattr(f, "jinja_pass_arg", None) is not None

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> Any:
        _meter().step()
        first = 1 if takes_first else 0
        if name == "join" and len(args) > first:
            args = (*args[:first], _join_items(args[first]), *args[first + 1 :])
        rest = args[first + 1 :]
        value = args[first] if len(args) > first else None
        _check_int_args(name, rest, kwargs)
        _check_growth(name, value, rest, kwargs)
        if name == "format" and isinstance(value, str):
            _check_printf(value, rest)
            _check_widths(_FORMAT_NUMBER.findall(value))
        return _check_result(f(*args, **kwargs))

    return run


def _counted(iterable: Any) -> Iterator[Any]:
    """A for loop's iterable: each iteration is a step of the budget."""
    meter = _meter()
    for item in iterable:
        meter.step()
        yield item


def _checked_concat(parts: Iterable[Any]) -> str:
    """`a ~ b` and a block's collected output, refused before joining when the result would be over budget."""
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    _meter().size(sum(map(len, texts)))
    return "".join(texts)


class _Formatter(SandboxedFormatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_widths(_FORMAT_NUMBER.findall(format_spec))
        return _check_result(super().format_field(value, format_spec))


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with `~` joining through the budget."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


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
    """The immutable sandbox, with every call, filter, loop iteration and growing operator charged to
    the render's budget, so one row cannot exhaust the server's memory or CPU."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _CodeGenerator
    # Blocks ({% set %}, macros, {% filter %}) join their output with this.
    concat = staticmethod(_checked_concat)  # type: ignore[assignment]
    checked_concat = staticmethod(_checked_concat)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        _meter().step()
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > _MAX_EXPONENT:
                raise RenderBudgetError(f"an exponent over {_MAX_EXPONENT:,}")
            if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
                raise RenderBudgetError(f"a number of more than {_MAX_INT_BITS:,} bits")
            return _check_result(operator.pow(left, right))
        if operator_ == "%":
            if isinstance(left, str):
                _check_printf(left, right)
            return _check_result(operator.mod(left, right))
        if operator_ == "+":
            return _check_result(operator.add(left, right))
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                raise RenderBudgetError(f"a repetition of more than {_MAX_REPEAT:,} items")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise RenderBudgetError(f"a number of more than {_MAX_INT_BITS:,} bits")
        return _check_result(operator.mul(left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's signature)
        _meter().step()
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            _check_int_args(name, args, kwargs)
            if name == "join" and args:
                args = (_join_items(args[0]), *args[1:])
                _check_growth(name, args[0], (owner,), kwargs)
            else:
                _check_growth(name, owner, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` and `format_map` with each field's width and precision under the budget."""
        if super().wrap_str_format(value) is None:
            return None
        text: str = value.__self__
        vformat = _Formatter(self).vformat
        if value.__name__ == "format_map":
            def fmt_map(mapping: Mapping[str, Any]) -> str:
                return vformat(text, (), mapping)
            return fmt_map

        def fmt(*args: Any, **kwargs: Any) -> str:
            return vformat(text, args, kwargs)
        return fmt


def _environment() -> _Environment:
    env = _Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson  # Jinja's own escapes <, > and & for HTML
    env.filters = {name: _guarded(name, f) for name, f in env.filters.items()}
    env.filters[_COUNTED] = _counted
    del env.globals["lipsum"]  # generates text of any requested size
    return env


_COUNTED = "_budget_iter"


_ENV = _environment()


# A template that only puts columns between plain text, as (is a column name, text) parts.
_Parts = tuple[tuple[bool, str], ...]
_MISSING = object()


def _compile(source: str, where: str) -> tuple[jinja2.Template, _Parts | None, frozenset[str], frozenset[str]]:
    """The template, its plain parts (if any), the variables it uses and the columns it names as row[...]."""
    try:
        ast = _ENV.parse(source)
        parts, used, keys = _substitution_parts(ast), frozenset(meta.find_undeclared_variables(ast)), _row_keys(ast)
        for loop in ast.find_all(nodes.For):  # every iteration of every loop is charged to the budget
            loop.iter = nodes.Filter(loop.iter, _COUNTED, [], [], None, None, lineno=loop.lineno)
        template = _ENV.from_string(ast)
    except jinja2.TemplateSyntaxError as e:
        raise SpecError(f"The {where} template has a syntax error on line {e.lineno}: {e.message}.") from None
    return template, parts, used, keys


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
        budget: RenderBudget = DEFAULT_BUDGET,
    ):
        self.budget = budget
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
        # Only text and {{ column }}: rendering is joining strings, cheap and bounded by the row's size.
        self.substitution_only = all(parts is not None for _, _, parts in self._messages)
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
        meter = _Meter(self.budget)
        token = _METER.set(meter)
        try:
            return template.render(context)  # joined by _checked_concat: its length is checked before joining
        except PromptError:
            raise
        except RecursionError:
            raise RenderBudgetError("macros nested too deep") from None
        except MemoryError:
            raise RenderBudgetError("out of memory") from None
        except Exception as e:  # any failure inside a user's template is this row's problem
            raise PromptError(_row_error(e)) from None
        finally:
            _METER.reset(token)

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
