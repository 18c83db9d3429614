"""Standard input and output as a job's input and output: stdin is spooled to the state directory so that a
resume can read it again; `-o -` writes the rows to stdout as JSON Lines, chunk by chunk in chunk order."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from backfill.errors import BackfillError, SpecError
from backfill.io.sinks import FINALIZED_MARKER, Sink, _fsync_dir, output_format
from backfill.io.sources import INPUT_FORMATS

STDIO = "-"
_COPY_BLOCK = 1 << 20
# A compressed stream's first bytes, and the suffix by which pyarrow's readers detect its compression.
_MAGIC = ((b"\x1f\x8b", ".gz"), (b"BZh", ".bz2"), (b"\x28\xb5\x2f\xfd", ".zst"), (b"\x04\x22\x4d\x18", ".lz4"))


def is_stdio(path: str | os.PathLike[str] | None) -> bool:
    """Whether a job's input or output path means standard input or output."""
    return path is not None and os.fspath(path) == STDIO


def spool_stdin(state_dir: str | os.PathLike[str], input_format: str | None, stream: BinaryIO | None = None) -> Path:
    """Copy standard input (or `stream`) to `<state_dir>/stdin/<sha256>.<format>` and return that path.

    The same bytes land in the same file, so piping the same data again resumes the same job.
    The copy streams in blocks (memory stays bounded) into a temporary file that is fsynced,
    then renamed into place: a crash leaves no half-written spool under a final name.
    """
    fmt = INPUT_FORMATS.get((input_format or "").lower().lstrip("."))
    if fmt is None:
        raise SpecError(
            "Reading from standard input needs its format, since a pipe has no file extension;"
            " pass --input-format csv, tsv, jsonl or parquet."
        )
    if stream is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise SpecError("--input - reads standard input, which is a terminal here; pipe the table in or give a file.")
        stream = sys.stdin.buffer
    directory = Path(state_dir).expanduser() / "stdin"
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    head = b""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".stdin-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            while block := stream.read(_COPY_BLOCK):
                digest.update(block)
                head = head or block[:4]
                f.write(block)
                size += len(block)
            f.flush()
            os.fsync(f.fileno())
        if size == 0:
            raise SpecError("Standard input was empty; pipe the table into backfill, or give a file with --input.")
        compressed = next((suffix for magic, suffix in _MAGIC if head.startswith(magic)), "")
        target = directory / f"{digest.hexdigest()}.{fmt}{'' if fmt == 'parquet' else compressed}"
        if target.exists():
            # Already spooled by an earlier run: keep that file, whose mtime is part of the job's input fingerprint.
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
            _fsync_dir(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_stdout_format(format: str | None) -> None:
    """Standard output takes JSON Lines only: one row a line is what a pipe's reader can consume as it comes."""
    if format is not None and output_format(STDIO, format) != "jsonl":
        raise SpecError(
            f"Standard output (--output -) takes JSON Lines only, not {format}; drop --output-format or write to a file."
        )


class StdoutSink(Sink):
    """Writes each chunk's part under the state directory, as a file sink does, and emits the rows to stdout
    as JSON Lines once their chunk is committed in the ledger, in chunk order.

    Every run emits every committed row of the job once, from chunk 0 on: the chunks done in earlier
    runs are read back from their parts, so the standard output of the run that completes the job is
    the whole table, the same as a .jsonl file output. The parts are kept after the job completes
    (they are its only copy of the output), so a re-run of a completed job prints the table again.
    """

    def __init__(self, *, parts_dir: str | os.PathLike[str], schema: pa.Schema, stream: BinaryIO | None = None):
        super().__init__(Path(parts_dir) / "result.jsonl", format="jsonl", parts_dir=parts_dir, schema=schema)
        self.path = Path(STDIO)
        self._stream = stream
        self._committed: set[int] = set()
        self._next = 0  # the first chunk not yet emitted

    def committed(self, chunks: Iterable[int]) -> None:
        self._committed.update(chunks)
        while self._next in self._committed:
            self._emit(self._next)
            self._committed.discard(self._next)
            self._next += 1

    def _emit(self, chunk_index: int) -> None:
        stream = self._stream or sys.stdout.buffer
        with pq.ParquetFile(self.part_path(chunk_index)) as pf:
            batches = (b.cast(self.schema) for b in pf.iter_batches(use_threads=False))
            try:
                self._write_jsonl(stream, batches)
                stream.flush()
            except BrokenPipeError:
                # Python would report the pipe again when it flushes stdout at exit: point stdout at nothing.
                if self._stream is None:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
                    os.close(devnull)
                raise BackfillError(
                    "Standard output was closed before all rows were written (the reader of the pipe exited);"
                    " the rows are kept, run the same command again to print them all."
                ) from None

    def is_finalized(self, n_chunks: int) -> bool:
        """Whether the job completed and its parts are all there to print again (a part removed since is rebuilt)."""
        marker = self.parts_dir / FINALIZED_MARKER
        complete = marker.exists() and marker.read_text().strip() == str(n_chunks)
        return complete and all(self.part_path(i).exists() for i in range(n_chunks))

    def finalize(self, n_chunks: int) -> Path:
        """Check every chunk is there and was emitted; the parts stay as the job's output."""
        self._check_parts(n_chunks)
        self.committed(range(n_chunks))
        (self.parts_dir / FINALIZED_MARKER).write_text(str(n_chunks))
        return self.path


def make_sink(path: str | os.PathLike[str], *, format: str | None, parts_dir: str | os.PathLike[str], schema: pa.Schema) -> Sink:
    """The sink of a job's output: standard output for `-`, else the file at `path`."""
    if is_stdio(path):
        return StdoutSink(parts_dir=parts_dir, schema=schema)
    return Sink(path, format=format, parts_dir=parts_dir, schema=schema)
