"""Sources: stream an input table (Parquet, CSV, JSONL file or an in-memory frame) in Arrow batches.

Memory stays bounded by the batch and block size, never by the input size.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import sqlite3
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq
from pyarrow import ipc

from backfill.errors import SpecError

INPUT_FORMATS = {"parquet": "parquet", "pq": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "ndjson": "jsonl"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
_FORMAT_HINT = "use --input-format parquet|csv|jsonl"
# Bytes parsed at a time from text files: large enough for fast parsing, small enough to bound memory.
_TEXT_BLOCK = 4 << 20
_HASH_BATCH = 65536


@runtime_checkable
class Source(Protocol):
    """An input table that can be streamed more than once (plan, run, resume)."""

    @property
    def columns(self) -> list[str]: ...

    @property
    def schema(self) -> pa.Schema: ...

    def num_rows(self) -> int | None: ...

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows in batches of exactly `batch_size` (the last may be shorter); only `columns` if given."""
        ...

    def head(self, n: int) -> list[dict[str, Any]]: ...

    def fingerprint(self) -> str: ...


def rebatch(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream of batches into batches of exactly `size` rows (the last may be shorter)."""
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    pending: list[pa.RecordBatch] = []
    n = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - n, batch.num_rows)
            pending.append(batch.slice(0, take))
            n += take
            batch = batch.slice(take)
            if n == size:
                yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                pending, n = [], 0
    if n:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


def _codec(encoding: str | None) -> str | None:
    """The Python codec name of `encoding`; None for UTF-8, which is read as it is, without transcoding."""
    if encoding is None:
        return None
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise SpecError(
            f"Unknown input encoding '{encoding}'; give a codec name such as latin-1, cp1252 or utf-16."
        ) from None
    return None if name == "utf-8" else name


def _not_utf8(path: Path, line: int, byte: int) -> SpecError:
    return SpecError(
        f"Input file '{path}' is not valid UTF-8 at line {line} (byte 0x{byte:02x}); "
        "pass --input-encoding latin-1 (or the file's encoding)."
    )


def _utf8_error(path: Path) -> SpecError | None:
    """Where `path` (decompressed) first stops being UTF-8, as the error to raise; None when it is all UTF-8.

    Only called once a reader has seen bad text, so the valid case costs nothing.
    """
    line = 1
    rest = b""
    with pa.input_stream(str(path), compression="detect") as f:
        while True:
            chunk = f.read(_TEXT_BLOCK)
            data = rest + chunk
            try:
                # Not final until the end: a character cut at the chunk's edge is carried over.
                _, used = codecs.utf_8_decode(data, "strict", not chunk)
            except UnicodeDecodeError as e:
                return _not_utf8(path, line + data.count(b"\n", 0, e.start), data[e.start])
            if not chunk:
                return None
            line += data.count(b"\n", 0, used)
            rest = data[used:]


def _undecodable(path: Path, encoding: str, e: UnicodeDecodeError) -> SpecError:
    byte = e.object[e.start : e.start + 1].hex()
    return SpecError(
        f"Input file '{path}' cannot be decoded as {encoding} (byte 0x{byte}: {e.reason}); "
        "pass the file's encoding with --input-encoding."
    )


def _select(batches: Iterable[pa.RecordBatch], columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    return iter(batches) if columns is None else (b.select(columns) for b in batches)


def _head(source: Source, n: int) -> list[dict[str, Any]]:
    if n <= 0:
        return []
    for batch in source.batches(n):
        return batch.to_pylist()
    return []


class _FileSource:
    """What all file sources share: the path, the text encoding, and a fingerprint from path, size and mtime."""

    def __init__(self, path: Path, encoding: str | None = None):
        self.path = path
        self.encoding = encoding  # a codec name; None for UTF-8

    def fingerprint(self) -> str:
        st = self.path.stat()
        ident = f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if self.encoding is not None:  # the same bytes decoded another way are other rows
            ident += f"|{self.encoding}"
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def head(self, n: int) -> list[dict[str, Any]]:
        return _head(self, n)  # type: ignore[arg-type]

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)  # type: ignore[attr-defined]


class ParquetSource(_FileSource):
    """A Parquet file: row count and schema from its metadata, batches read row group by row group."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with pq.ParquetFile(path) as pf:
                self._schema = pf.schema_arrow
                self._num_rows = pf.metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise SpecError(f"Cannot read '{path}' as Parquet ({e}); {_FORMAT_HINT}.") from None

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def num_rows(self) -> int:
        return self._num_rows

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        with pq.ParquetFile(self.path) as pf:
            # One row group at a time: asked for all at once, pyarrow pre-buffers the whole file.
            groups = (
                pf.iter_batches(batch_size=batch_size, row_groups=[i], columns=columns)
                for i in range(pf.num_row_groups)
            )
            yield from rebatch((b for g in groups for b in g), batch_size)


_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)")


class CsvSource(_FileSource):
    """A CSV/TSV file, parsed block by block.

    Column types are inferred from the first block; a first full pass (which also counts
    the rows) widens any column whose later values do not fit (int → float → string), so
    types never change half-way through a run. Dates and times stay text, as written.
    Text is UTF-8 unless an encoding is given, and pyarrow transcodes it; text that is not
    UTF-8 is an error naming its line, never a binary column.
    """

    def __init__(self, path: Path, delimiter: str = ",", encoding: str | None = None):
        super().__init__(path, encoding)
        self._parse = pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
        self._read = pcsv.ReadOptions(block_size=_TEXT_BLOCK, encoding=encoding or "utf8")
        self._types: dict[str, pa.DataType] | None = None
        self._num_rows: int | None = None
        self._first_schema = self._open(None).schema
        self._check_text(self._first_schema)

    def _check_text(self, schema: pa.Schema) -> None:
        """Raise when pyarrow met bytes that are not UTF-8: it reads such a column as binary, and
        keeps such a header's bytes as they are (reading the name then fails)."""
        if self.encoding is not None:
            return  # transcoded: errors surface as UnicodeDecodeError
        try:
            _ = schema.names
            suspect = any(pa.types.is_binary(t) for t in schema.types)
        except UnicodeDecodeError:
            suspect = True
        error = _utf8_error(self.path) if suspect else None
        if error is not None:
            raise error

    def _open(self, types: dict[str, pa.DataType] | None) -> pcsv.CSVStreamingReader:
        convert = pcsv.ConvertOptions(column_types=types or {}, timestamp_parsers=[])
        try:
            return pcsv.open_csv(
                pa.input_stream(str(self.path), compression="detect"),
                read_options=self._read,
                parse_options=self._parse,
                convert_options=convert,
            )
        except pa.ArrowInvalid as e:
            if "Empty CSV file" in str(e):
                raise SpecError(f"Input file '{self.path}' is empty; a CSV needs at least a header line.") from None
            raise SpecError(f"Cannot read '{self.path}' as CSV ({e}); {_FORMAT_HINT}.") from None
        except UnicodeDecodeError as e:
            raise _undecodable(self.path, self.encoding or "utf-8", e) from None
        except OSError as e:
            raise SpecError(f"Cannot read '{self.path}' ({e}).") from None

    def _scan(self) -> None:
        # Temporal types would re-format the user's text ("2020-01-01" → "2020-01-01 00:00:00").
        types = {
            f.name: pa.string() for f in self._first_schema if pa.types.is_temporal(f.type) or pa.types.is_null(f.type)
        }
        while True:
            reader = self._open(types)
            names = reader.schema.names
            try:
                self._num_rows = sum(b.num_rows for b in reader)
            except UnicodeDecodeError as e:
                raise _undecodable(self.path, self.encoding or "utf-8", e) from None
            except pa.ArrowInvalid as e:
                m = _CSV_CONVERSION.search(str(e))
                # Bad UTF-8 in a column typed string: widening cannot help (it would retry for ever).
                error = _utf8_error(self.path) if "invalid UTF8" in str(e) else None
                if error is not None:
                    raise error from None
                if not m:
                    raise SpecError(f"Cannot read '{self.path}' as CSV ({e}).") from None
                name = names[int(m.group(1))]
                types[name] = pa.float64() if m.group(2) == "int64" else pa.string()
                continue
            self._check_text(reader.schema)
            self._types = types
            self._schema = reader.schema
            return

    @property
    def schema(self) -> pa.Schema:
        if self._types is None:
            self._scan()
        return self._schema

    @property
    def columns(self) -> list[str]:
        return list(self._first_schema.names)

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._scan()
        assert self._num_rows is not None
        return self._num_rows

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        if self._types is None:
            self._scan()
        yield from rebatch(_select(self._open(self._types), columns), batch_size)


def _text_to_string(t: pa.DataType) -> pa.DataType:
    """Timestamps inferred from JSON strings go back to the text the user wrote."""
    if pa.types.is_temporal(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_text_to_string(f.type)) for f in t])
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pa.list_(t.value_field.with_type(_text_to_string(t.value_type)))
    return t


def _merge_types(name: str, a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type that holds both `a` and `b` (int and float: float); None when there is none."""
    if a == b:
        return a
    try:
        merged = pa.unify_schemas([pa.schema([(name, a)]), pa.schema([(name, b)])], promote_options="permissive")
        return merged.field(name).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _mixed_types(field: str, was: object, now: object, line: int | str) -> SpecError:
    return SpecError(
        f"JSONL field '{field}' holds values of different types ({was} and {now}, the first {now} at line {line}); "
        "make them one type or convert the file to Parquet."
    )


_JSON_TYPE_CHANGE = re.compile(r"Column\((/[^)]*)\) changed from (\w+) to (\w+) in row (\d+)")


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


@dataclass
class _Block:
    data: bytes
    first_line: int  # 1-based line number of the block's first line, for error messages

    def rows(self) -> Iterator[tuple[int, bytes]]:
        """The lines that hold a row, with their 1-based line numbers; pyarrow skips blank lines too.

        Only error paths call this: it splits the whole block."""
        for number, line in enumerate(self.data.split(b"\n"), self.first_line):
            if line.strip():
                yield number, line

    def line_of_row(self, row: int) -> int | None:
        """The line number of the block's 0-based `row`, as pyarrow counts rows."""
        for i, (number, _) in enumerate(self.rows()):
            if i == row:
                return number
        return None

    def first_non_object(self) -> tuple[int, str] | None:
        """The first line that is not one JSON object, with why; None when every line is one."""
        for number, line in self.rows():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                return number, f"{e.msg} at column {e.colno}"
            if not isinstance(value, dict):
                return number, f"a JSON {_JSON_KINDS.get(type(value), 'value')}, not an object"
        return None

    def first_misfit(self, name: str, type_: pa.DataType) -> tuple[int, pa.DataType] | None:
        """The first line whose field `name` holds a value that does not fit `type_`, with that value's type."""
        for number, line in self.rows():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:  # pyarrow took it (two objects on a line): not this field's fault
                continue
            value = row.get(name) if isinstance(row, dict) else None
            if value is None:
                continue
            try:
                found = _text_to_string(pa.array([value]).type)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # a list of mixed values: no type fits it
                return number, pa.string()
            if _merge_types(name, type_, found) is None:
                return number, found
        return None


class JsonlSource(_FileSource):
    """A JSON Lines file, read in line-aligned blocks that pyarrow parses.

    The first full pass counts the rows, checks the text is UTF-8 (pyarrow's JSON reader
    does not) and unifies the types every block infers (new fields, int → float), so every
    batch has the same schema. With an encoding, the stream is transcoded to UTF-8 first.
    """

    def __init__(self, path: Path, encoding: str | None = None):
        super().__init__(path, encoding)
        self._schema: pa.Schema | None = None
        self._num_rows: int | None = None
        try:
            with self._stream() as f:
                f.read(1)
        except OSError as e:
            raise SpecError(f"Cannot read '{path}' ({e}).") from None
        except UnicodeDecodeError as e:
            raise _undecodable(path, self.encoding or "utf-8", e) from None

    def _stream(self) -> pa.NativeFile:
        stream = pa.input_stream(str(self.path), compression="detect")
        if self.encoding is None:
            return stream
        return pa.transcoding_input_stream(stream, self.encoding, "utf-8")

    def _blocks(self) -> Iterator[_Block]:
        line = 1
        rest = b""
        with self._stream() as f:
            while True:
                chunk = f.read(_TEXT_BLOCK)
                buf = rest + chunk
                if not chunk:
                    if buf.strip():
                        yield _Block(buf + b"\n", line)
                    return
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    rest = buf  # one line longer than a block: keep reading
                    continue
                block, rest = buf[:cut], buf[cut:]
                if not block.isspace():
                    yield _Block(block, line)
                line += block.count(b"\n")

    def _parse(self, block: _Block, schema: pa.Schema | None) -> pa.Table:
        read = pjson.ReadOptions(block_size=max(len(block.data), 1 << 16))
        parse = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore" if schema else "infer")
        try:
            return pjson.read_json(pa.BufferReader(block.data), read_options=read, parse_options=parse)
        except pa.ArrowInvalid as e:
            raise self._parse_error(block, str(e)) from None

    def _parse_error(self, block: _Block, message: str) -> SpecError:
        """The error naming the line at fault: pyarrow counts rows from the block's start, skipping blank lines,
        and reads past the end of a broken line before it notices."""
        bad = block.first_non_object()
        if bad is not None:
            line, why = bad
            return SpecError(
                f"Cannot read '{self.path}' as JSON Lines: line {line} is not one JSON object ({why}); "
                f"fix that line, or {_FORMAT_HINT}."
            )
        changed = _JSON_TYPE_CHANGE.search(message)
        if changed:
            field, was, now, row = changed.groups()
            line = block.line_of_row(int(row))
            return _mixed_types(field.lstrip("/").replace("/", "."), was, now, line or f"{block.first_line} or later")
        return SpecError(
            f"Cannot read '{self.path}' as JSON Lines from line {block.first_line} on ({message}); "
            f"each line must be one JSON object, or {_FORMAT_HINT}."
        )

    def _misfit_error(self, block: _Block, name: str, was: pa.DataType, now: pa.DataType) -> SpecError:
        """A field whose values in this block do not fit its type in the blocks before, naming the first such line."""
        misfit = block.first_misfit(name, was)
        if misfit is None:
            return _mixed_types(name, was, now, f"{block.first_line} or later")
        line, found = misfit
        return _mixed_types(name, was, found, line)

    def _check_utf8(self, block: _Block) -> None:
        try:
            codecs.utf_8_decode(block.data, "strict", True)
        except UnicodeDecodeError as e:
            line = block.first_line + block.data.count(b"\n", 0, e.start)
            raise _not_utf8(self.path, line, block.data[e.start]) from None

    def _scan(self) -> None:
        try:
            self._scan_blocks()
        except UnicodeDecodeError as e:
            raise _undecodable(self.path, self.encoding or "utf-8", e) from None

    def _scan_blocks(self) -> None:
        fields: dict[str, pa.DataType] = {}
        rows = 0
        for block in self._blocks():
            if self.encoding is None:
                self._check_utf8(block)
            table = self._parse(block, None)
            rows += table.num_rows
            for f in table.schema:
                t = _text_to_string(f.type)
                merged = _merge_types(f.name, fields[f.name], t) if f.name in fields else t
                if merged is None:
                    raise self._misfit_error(block, f.name, fields[f.name], t)
                fields[f.name] = merged
        self._schema = pa.schema(list(fields.items()))
        self._num_rows = rows

    @property
    def schema(self) -> pa.Schema:
        if self._schema is None:
            self._scan()
        assert self._schema is not None
        return self._schema

    def num_rows(self) -> int:
        if self._num_rows is None:
            self._scan()
        assert self._num_rows is not None
        return self._num_rows

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        schema = self.schema
        if not schema.names:
            return
        tables = (self._parse(block, schema) for block in self._blocks())
        yield from rebatch(_select((b for t in tables for b in t.to_batches()), columns), batch_size)


class _HashWriter:
    """A write-only file that only hashes what is written."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _content_hash(schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> str:
    """Hash the data, not its layout: batches are re-cut to a fixed size before serialising."""
    out = _HashWriter()
    with ipc.new_stream(pa.PythonFile(out, mode="w"), schema) as writer:
        for batch in rebatch(batches, _HASH_BATCH):
            writer.write_batch(batch)
    return out.hash.hexdigest()[:32]


class ArrowSource:
    """An in-memory Arrow table (also what pandas and polars frames become)."""

    def __init__(self, table: pa.Table):
        self.table = table.replace_schema_metadata(None)
        self._fingerprint: str | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.table.schema.names)

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    def num_rows(self) -> int:
        return self.table.num_rows

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        yield from rebatch(_select(self.table.to_batches(), columns), batch_size)

    def head(self, n: int) -> list[dict[str, Any]]:
        return self.table.slice(0, max(n, 0)).to_pylist()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _content_hash(self.schema, self.table.to_batches())
        return self._fingerprint


class SpooledSource:
    """A one-shot RecordBatchReader, spooled to a temporary Arrow file so it can be read again.

    The file is memory-mapped, so reading it does not hold the input in process memory;
    it is deleted when the source is garbage-collected.
    """

    def __init__(self, reader: pa.RecordBatchReader):
        fd, name = tempfile.mkstemp(prefix="backfill-spool-", suffix=".arrow")
        self.path = Path(name)
        weakref.finalize(self, os.unlink, name)
        schema = reader.schema.remove_metadata()
        digest = _HashWriter()
        with (
            os.fdopen(fd, "wb") as f,
            ipc.new_file(f, schema) as spool,
            ipc.new_stream(pa.PythonFile(digest, mode="w"), schema) as hashed,
        ):
            for batch in rebatch(reader, _HASH_BATCH):
                batch = batch.replace_schema_metadata(None)
                spool.write_batch(batch)
                hashed.write_batch(batch)
        self._fingerprint = digest.hash.hexdigest()[:32]
        self._schema = schema
        with pa.memory_map(name) as m:
            r = ipc.open_file(m)
            self._num_rows = sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))

    @property
    def columns(self) -> list[str]:
        return list(self._schema.names)

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def num_rows(self) -> int:
        return self._num_rows

    def batches(self, batch_size: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        with pa.memory_map(str(self.path)) as m:
            r = ipc.open_file(m)
            yield from rebatch(_select((r.get_batch(i) for i in range(r.num_record_batches)), columns), batch_size)

    def head(self, n: int) -> list[dict[str, Any]]:
        return _head(self, n)

    def fingerprint(self) -> str:
        return self._fingerprint


def _file_format(path: Path, format: str | None) -> str:
    if format is not None:
        fmt = INPUT_FORMATS.get(format.lower().lstrip("."))
        if fmt is None:
            raise SpecError(f"Unknown input format '{format}'; {_FORMAT_HINT}.")
        return fmt
    name = path.name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    ext = name.rpartition(".")[2] if "." in name else ""
    fmt = INPUT_FORMATS.get(ext)
    if fmt is None:
        raise SpecError(f"Cannot tell the format of '{path}' from its extension; {_FORMAT_HINT}.")
    return fmt


def _frame_table(data: Any) -> pa.Table | None:
    """An in-memory frame as an Arrow table, or None when `data` is not a frame."""
    module = type(data).__module__.split(".")[0]
    try:
        if module == "pandas":
            import pandas as pd

            if isinstance(data, pd.DataFrame):
                return pa.Table.from_pandas(data, preserve_index=False)
        if module == "polars":
            import polars as pl

            if isinstance(data, pl.LazyFrame):
                data = data.collect()
            if isinstance(data, pl.DataFrame):
                return data.to_arrow()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SpecError(f"Cannot convert the frame to Arrow ({e}); give each column a single type.") from None
    return None


def open_source(data: Any, *, format: str | None = None, encoding: str | None = None) -> Source:
    """Open a file path (Parquet, CSV, TSV, JSONL; optionally compressed) or an in-memory frame as a Source.

    `encoding` is the text encoding of a CSV or JSONL file (default UTF-8).
    """
    codec = _codec(encoding)
    if codec is not None and not isinstance(data, (str, os.PathLike)):
        raise SpecError("The input encoding applies to CSV and JSONL files only; drop --input-encoding.")
    if isinstance(data, pa.Table):
        return ArrowSource(data)
    if isinstance(data, Source):
        return data
    if isinstance(data, pa.RecordBatch):
        return ArrowSource(pa.Table.from_batches([data]))
    if isinstance(data, pa.RecordBatchReader):
        return SpooledSource(data)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if not path.exists():
            raise SpecError(f"Input file '{path}' does not exist; check the path.")
        if path.is_dir():
            raise SpecError(f"Input '{path}' is a directory; give one file.")
        if not os.access(path, os.R_OK):
            raise SpecError(f"Input file '{path}' is not readable; check its permissions.")
        fmt = _file_format(path, format)
        if fmt == "parquet":
            if codec is not None:
                raise SpecError(
                    f"Input file '{path}' is Parquet, whose text is always UTF-8; the input encoding applies to"
                    " CSV and JSONL files only, so drop --input-encoding."
                )
            return ParquetSource(path)
        if fmt in ("csv", "tsv"):
            return CsvSource(path, delimiter="\t" if fmt == "tsv" else ",", encoding=codec)
        return JsonlSource(path, encoding=codec)
    table = _frame_table(data)
    if table is not None:
        return ArrowSource(table)
    raise SpecError(
        f"Cannot read input of type {type(data).__name__}; give a file path, a pandas or polars DataFrame, "
        "or a pyarrow Table or RecordBatchReader."
    )


def _id_values(ids: pa.Array, column: str) -> pa.Array:
    """Ids as integers that fit int64 or as text, so they pass through JSON into SQLite unchanged."""
    t = ids.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return ids
    if pa.types.is_integer(t) and (pa.types.is_signed_integer(t) or t.bit_width < 64):
        return ids
    try:
        return ids.cast(pa.string())  # dates, decimals, uint64 beyond int64: their exact text
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise SpecError(
            f"The id column '{column}' has type {t}, which cannot serve as a row id; use integers or text."
        ) from None


def check_id_column(source: Source, column: str) -> None:
    """Raise SpecError unless `column` exists, has no nulls and no duplicates.

    The ids are streamed into a SQLite table on disk, one JSON array per batch, so memory stays
    bounded however many rows there are (about 0.3 s per million rows).
    """
    if column not in source.columns:
        raise SpecError(f"The id column '{column}' is not in the input; it has {', '.join(source.columns)}.")
    nulls = 0
    with tempfile.TemporaryDirectory(prefix="backfill-ids-") as tmp:
        db = sqlite3.connect(Path(tmp) / "ids.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE ids (id PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID")
            db.execute("BEGIN")
            for batch in source.batches(65536, [column]):
                ids = batch.column(column)
                nulls += ids.null_count
                # A WHERE clause is also what lets SQLite parse an upsert after a SELECT.
                db.execute(
                    "INSERT INTO ids SELECT value, 1 FROM json_each(?) WHERE value IS NOT NULL"
                    " ON CONFLICT(id) DO UPDATE SET n = n + 1",
                    (orjson.dumps(_id_values(ids, column).to_pylist()).decode(),),
                )
            db.execute("COMMIT")
            dupes = db.execute("SELECT count(*) FROM ids WHERE n > 1").fetchone()[0]
            examples = [r[0] for r in db.execute("SELECT id FROM ids WHERE n > 1 LIMIT 3")]
        finally:
            db.close()
    if nulls:
        raise SpecError(f"The id column '{column}' has {nulls} empty value(s); every row needs an id.")
    if dupes:
        shown = ", ".join(repr(v) for v in examples)
        raise SpecError(
            f"The id column '{column}' has {dupes} duplicated value(s) (e.g. {shown}); row ids must be unique."
        )
