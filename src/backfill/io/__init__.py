"""Sources and sinks: stream input tables in Arrow batches, write results chunk by chunk, atomically."""

from backfill.io.schema import arrow_type_for, output_fields, output_table
from backfill.io.sinks import Sink, check_writable, output_format
from backfill.io.sources import Source, check_id_column, open_source, rebatch
from backfill.io.stdio import StdoutSink, check_stdout_format, is_stdio, make_sink, spool_stdin

__all__ = [
    "Sink",
    "Source",
    "StdoutSink",
    "arrow_type_for",
    "check_id_column",
    "check_stdout_format",
    "check_writable",
    "is_stdio",
    "make_sink",
    "open_source",
    "output_fields",
    "output_format",
    "output_table",
    "rebatch",
    "spool_stdin",
]
