"""The one table of a job's options: `run`'s and `estimate`'s flags, the job file's keys and `backfill.run`'s keywords all come from it.

Add an option here once; the CLI, `from_options` and the README's table follow.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Optional

import typer

from backfill.errors import SpecError


class Scope(StrEnum):
    SPEC = "spec"  # part of the JobSpec: decides the job (and mostly its id)
    RUN = "run"  # how this one run behaves; never part of the spec or the job id


class Kind(StrEnum):
    """How a value is written on the command line and turned into the spec's value."""

    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    FLAG = "flag"  # a boolean flag: given means True, absent leaves the job file's value
    LIST = "list"  # repeatable flag; each value may also be comma-separated
    DURATION = "duration"  # 500ms, 30s, 10m, 6h, 7d or seconds
    SCHEMA = "schema"  # a JSON Schema: a file on the command line; a dict, JSON text or pydantic model in Python
    MAPPING = "mapping"  # Python and job file only (params, prices, messages)
    PATH = "path"  # a directory or file of the run (not of the spec)


# A key path segment replaced by the job's model (the price flags set `prices."MODEL".input`).
MODEL = "{model}"

RUN_CMD, ESTIMATE_CMD, RESUME_CMD = "run", "estimate", "resume"
_JOB = frozenset({RUN_CMD, ESTIMATE_CMD})


@dataclass(frozen=True)
class Option:
    """One setting: its Python keyword, its flags, where it goes in the JobSpec, its help and its shown default."""

    name: str  # the Python keyword and the Typer parameter name
    help: str
    default: str  # what the help shows as the default (the spec's own default, or what happens when unset)
    kind: Kind = Kind.TEXT
    path: tuple[str, ...] | None = None  # the key in the job file / JobSpec; None for run settings
    flags: tuple[str, ...] = ()  # empty: no flag (Python and job file only)
    commands: frozenset[str] = _JOB  # every spec option is on estimate too: its job id must be run's
    scope: Scope = Scope.SPEC
    python: bool = True  # a keyword of `backfill.run` / `from_options`
    choices: tuple[str, ...] = ()
    envvar: str | None = None

    @property
    def key(self) -> str:
        """The job file key, e.g. 'task.params.max_tokens'."""
        return ".".join('"MODEL"' if p == MODEL else p for p in self.path) if self.path else ""


def _spec(name: str, path: str, help: str, default: str, kind: Kind = Kind.TEXT, *flags: str, **more: Any) -> Option:
    if kind is Kind.MAPPING:  # no flag: a dict is written in Python or the job file
        return Option(name, help, default, kind, tuple(path.split(".")), (), **more)
    return Option(name, help, default, kind, tuple(path.split(".")), flags or (f"--{name.replace('_', '-')}",), **more)


def _run(name: str, help: str, default: str, kind: Kind, *flags: str, **more: Any) -> Option:
    return Option(name, help, default, kind, None, flags or (f"--{name.replace('_', '-')}",), scope=Scope.RUN, python=False, **more)


FORMATS = ("parquet", "csv", "jsonl")

OPTIONS: tuple[Option, ...] = (
    Option("job_file", "A job file (TOML or YAML); flags override its keys.", "none", Kind.PATH, None, ()),
    # --- input
    _spec("input", "input.path", "Input table: Parquet, CSV or JSONL file, or - for standard input (with --input-format).", "none", Kind.TEXT, "--input", "-i"),
    _spec("input_format", "input.format", "Input format when the file's extension does not say.", "from the extension", choices=FORMATS),
    _spec("input_encoding", "input.encoding", "Text encoding of a CSV or JSONL input.", "utf-8"),
    _spec("id_column", "input.id_column", "Column with the row id.", "the row's position"),
    # --- task
    _spec("prompt", "task.prompt", "User message template (Jinja2), e.g. 'Classify: {{ text }}'.", "none", Kind.TEXT, "--prompt", "-p"),
    _spec("system", "task.system", "System message template.", "none"),
    _spec("messages", "task.messages", "A full chat message list of templates instead of prompt/system.", "none", Kind.MAPPING),
    _spec("model", "task.model", "Model name, e.g. gpt-4o-mini (`backfill models` lists the priced ones).", "none", Kind.TEXT, "--model", "-m"),
    _spec("provider", "task.provider", "Who serves the model.", "sim", choices=("sim", "openai", "azure", "anthropic")),
    _spec("base_url", "task.base_url", "OpenAI-compatible server, e.g. http://localhost:8000/v1.", "the provider's"),
    _spec("api_key_env", "task.api_key_env", "Environment variable holding the API key.", "OPENAI_API_KEY / AZURE_OPENAI_API_KEY / ANTHROPIC_API_KEY"),
    _spec("kind", "task.kind", "What each row asks for.", "chat", choices=("chat", "embedding")),
    _spec("schema", "task.schema", "JSON Schema file of the output (an object); its properties become columns.", "free text", Kind.SCHEMA),
    _spec("params", "task.params", "Request parameters passed through (temperature, stop, ...).", "none", Kind.MAPPING),
    _spec("max_tokens", "task.params.max_tokens", "Most output tokens per answer.", "unset (4,096 reserved per request)", Kind.INT),
    _spec("temperature", "task.params.temperature", "Sampling temperature.", "the provider's", Kind.FLOAT),
    _spec("top_p", "task.params.top_p", "Nucleus sampling probability.", "the provider's", Kind.FLOAT),
    _spec("seed", "task.params.seed", "Sampling seed, where the provider supports it.", "none", Kind.INT),
    _spec("stop", "task.params.stop", "A stop sequence; repeat the flag for several.", "none", Kind.LIST),
    _spec("timeout_s", "task.timeout_s", "Time per request, e.g. 500ms, 30s, 10m or seconds.", "60s", Kind.DURATION, "--timeout"),
    _spec("context_tokens", "task.context_tokens", "Tokens the model accepts, prompt and output together.", "the built-in table", Kind.INT),
    # --- output
    _spec("output", "output.path", "Output file (.parquet, .csv, .jsonl), or - for JSONL on standard output.", "none", Kind.TEXT, "--output", "-o"),
    _spec("output_format", "output.format", "Output format when the extension does not say.", "from the extension", choices=FORMATS),
    _spec("if_exists", "output.if_exists", "When the output exists and is not this job's own.", "fail", choices=("fail", "replace", "append", "upsert")),
    _spec("columns", "output.columns", "Input columns passed through to the output (repeat, or comma-separated).", "none", Kind.LIST),
    # --- limits, retries, budget
    _spec("rpm", "limits.rpm", "Requests per minute.", "learned from the provider's headers", Kind.FLOAT),
    _spec("tpm", "limits.tpm", "Tokens per minute (Anthropic: input and output).", "learned from the provider's headers", Kind.FLOAT),
    _spec("input_tpm", "limits.input_tpm", "Input tokens per minute (Anthropic).", "learned from the provider's headers", Kind.FLOAT),
    _spec("output_tpm", "limits.output_tpm", "Output tokens per minute (Anthropic).", "learned from the provider's headers", Kind.FLOAT),
    _spec("max_in_flight", "limits.max_in_flight", "Requests in flight at once.", "256", Kind.INT),
    _spec("max_attempts", "retries.max_attempts", "Attempts per row for transient failures.", "6", Kind.INT),
    _spec("budget_usd", "budget.usd", "Spending never passes this (USD).", "no budget", Kind.FLOAT),
    _spec("allow_partial", "budget.allow_partial", "Start even if the estimate exceeds the budget; stop at it.", "off", Kind.FLAG),
    _spec("chunk_size", "chunk_size", "Rows per chunk, the unit of commit.", "500", Kind.INT),
    _spec("prices", "prices", "Price overrides by model: {model: {input, output, cached_input}} in USD per 1M tokens.", "the built-in table", Kind.MAPPING),
    _spec("price_input", f"prices.{MODEL}.input", "Price of the job's model's input, USD per 1M tokens.", "the built-in table", Kind.FLOAT),
    _spec("price_output", f"prices.{MODEL}.output", "Price of the job's model's output, USD per 1M tokens.", "the built-in table", Kind.FLOAT),
    # --- run settings: how this run behaves, never part of the job
    _run("expected_output_tokens", "Expected output tokens per row (at most max_tokens).", "the job's running mean, else 256", Kind.INT, commands=frozenset({ESTIMATE_CMD})),
    _run("state_dir", "Where the ledger lives.", "./.backfill", Kind.PATH, envvar="BACKFILL_STATE_DIR", commands=frozenset({RUN_CMD, ESTIMATE_CMD, RESUME_CMD})),
    _run("quiet", "No progress display.", "off", Kind.FLAG, "--quiet", "-q", commands=frozenset({RUN_CMD, RESUME_CMD})),
    _run("no_cache", "Do not reuse answers other jobs paid for (this job's own are always kept).", "off", Kind.FLAG, commands=frozenset({RUN_CMD, RESUME_CMD})),
    _run("wait", "If another process is running the job, wait for it instead of exiting (code 6).", "off", Kind.FLAG, commands=frozenset({RUN_CMD, RESUME_CMD})),
    _run("force", "Run a cancelled job again.", "off", Kind.FLAG, commands=frozenset({RUN_CMD, RESUME_CMD})),
    _run("log_every", "When standard error is not a terminal: one progress line this often (500ms, 30s, 10m ...).", "30s", Kind.DURATION, commands=frozenset({RUN_CMD, RESUME_CMD})),
    _run("log_format", "Format of the progress lines on standard error when it is not a terminal.", "text", Kind.TEXT, choices=("text", "json"), commands=frozenset({RUN_CMD, RESUME_CMD})),
    _run("as_json", "Print the result as one JSON object on standard output (standard error when the output is -).", "off", Kind.FLAG, "--json", commands=frozenset({RUN_CMD, ESTIMATE_CMD, RESUME_CMD})),
)

# The keywords `from_options` accepts: the spec's options and the job file.
SPEC_KEYWORDS: frozenset[str] = frozenset(o.name for o in OPTIONS if o.scope is Scope.SPEC and o.python)
RUN_SETTINGS: frozenset[str] = frozenset(o.name for o in OPTIONS if o.scope is Scope.RUN)


def check_keywords(given: set[str]) -> None:
    """Raise SpecError for the first keyword that is not a spec option, with a did-you-mean and the list of valid ones."""
    allowed = SPEC_KEYWORDS
    unknown = sorted(set(given) - allowed)
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, sorted(allowed), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise SpecError(f"Unknown option '{name}'; {hint}valid options: {', '.join(sorted(allowed))}.")


# --- the command line ------------------------------------------------------------------------------

_CLI_TYPE: dict[Kind, Any] = {
    Kind.TEXT: Optional[str], Kind.INT: Optional[int], Kind.FLOAT: Optional[float], Kind.FLAG: bool,
    Kind.LIST: Optional[list[str]], Kind.DURATION: Optional[str], Kind.SCHEMA: Optional[str], Kind.PATH: Optional[Path],
}


_METAVAR = {Kind.LIST: "<text>", Kind.DURATION: "<duration>", Kind.SCHEMA: "<file>"}


def _parameter(o: Option) -> inspect.Parameter:
    annotation = _CLI_TYPE[o.kind]
    if o.choices:  # Typer shows an Enum's values as the choices and refuses others
        annotation = Optional[StrEnum(o.name.title().replace("_", ""), {c: c for c in o.choices})]  # type: ignore[misc]
    if o.name == "job_file":
        default: Any = typer.Argument(None, help=o.help, show_default=False)
    else:
        default = typer.Option(
            False if o.kind is Kind.FLAG else None, *o.flags, help=o.help,
            show_default=False if o.kind is Kind.FLAG else o.default, envvar=o.envvar, metavar=_METAVAR.get(o.kind),
        )
    return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def cli_options(command: str) -> list[Option]:
    """The options a command takes, in the table's order."""
    return [o for o in OPTIONS if command in o.commands and (o.flags or o.name == "job_file") and o.kind is not Kind.MAPPING]


def with_options(command: str, extra: tuple[inspect.Parameter, ...] = ()) -> Any:
    """Give a `def f(**values)` command the table's options as its Typer signature (Typer reads `__signature__`)."""

    def decorate(func: Any) -> Any:
        params = [_parameter(o) for o in cli_options(command)] + list(extra)
        func.__signature__ = inspect.Signature(params)
        return func

    return decorate


def split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A command's values → (spec options for `from_options`, run settings)."""
    values = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
    spec = {k: v for k, v in values.items() if k not in RUN_SETTINGS}
    return spec, {k: v for k, v in values.items() if k in RUN_SETTINGS}
