"""The one reader of the user's files, for training and for `predict`: a CSV, TSV, JSON Lines
(or JSON array) or Parquet file as an Arrow table, every row as written.

- CSV is read as the csv module's default (Excel) dialect reads it: quoted cells may hold the
  delimiter, quotes and line breaks. Every cell is text.
- TSV is read without quoting, one line a row, as GLUE's files and pandas' ``QUOTE_NONE`` read
  it: a ``"`` is a character of the text, and a line whose fields do not match the header is
  refused (quoting would glue lines into one cell instead).
- JSON keeps its own types: strings, numbers, booleans, lists. Parquet keeps its schema.
- An empty cell (an empty CSV or TSV field, a JSON ``null`` or a missing key) is missing;
  ``"NA"``, ``"None"`` and ``"null"`` are text. Blank lines are skipped, as pandas and datasets
  skip them; rows are counted from 1 after the header, blank lines not counted.

Every refusal is a ``ValueError`` of one line naming the file and the row.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "FILE_FORMATS",
    "check_data_file",
    "check_text",
    "file_digest",
    "first_row",
    "plain",
    "read_json_lines",
    "read_table",
]

_CHUNK = 1 << 20  # bytes per read while hashing a file


def check_data_file(setting: str, path: str) -> None:
    """Refuse a data file that does not exist or whose extension names no known format (cheap:
    called when the settings are read).

    Raises:
        ValueError: naming the setting and the file.
    """
    if not Path(path).is_file():
        raise ValueError(f"{setting} {path}: no such file")
    if Path(path).suffix.lower() not in FILE_FORMATS:
        raise ValueError(
            f"{setting} {path}: unknown extension {Path(path).suffix or '(none)'!r}; "
            f"use one of {', '.join(FILE_FORMATS)}"
        )


def read_table(path: str | os.PathLike) -> pa.Table:
    """The file's rows as an Arrow table (the format by extension, see the module docstring).

    Raises:
        ValueError: one line naming the file: not UTF-8, empty, a row that does not fit the
            header, malformed JSON, a JSON column mixing kinds, an unreadable Parquet file.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    file_digest(path)  # refuses a text file that is not UTF-8, naming the line
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (no rows)")
    table = FILE_FORMATS[suffix](path)
    if table.num_rows == 0:
        raise ValueError(f"{path}: the file is empty (no rows)")
    return table


def file_digest(path: str) -> str:
    """SHA-256 of the file's bytes (first 16 hex digits), computed once per version of the file
    in this process; a text format is checked to be UTF-8 on the way."""
    stat = os.stat(path)
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # Size and modification time are part of the cache key: a rewritten file is hashed again.
    digest = hashlib.sha256()
    decoder = None if path.lower().endswith(".parquet") else codecs.getincrementaldecoder("utf-8")()
    lines = 1
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            if decoder is not None:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    line = lines + chunk.count(b"\n", 0, max(err.start, 0))
                    raise ValueError(
                        f"{path}: not valid UTF-8 (line {line}): save the file as UTF-8"
                    ) from None
                lines += chunk.count(b"\n")
        if decoder is not None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(
                    f"{path}: not valid UTF-8 (line {lines}): save the file as UTF-8"
                ) from None
    return digest.hexdigest()[:16]


def _read_csv(path: str) -> pa.Table:
    # strict: a quote inside an unquoted cell, or a quoted cell left open at the end of the
    # file, is an error instead of text that swallows the lines after it.
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file, strict=True)
        try:
            return _text_table(path, _numbered(reader, lambda: reader.line_num))
        except csv.Error as err:
            raise ValueError(
                f"{path}: line {reader.line_num}: {err}: close the quoted cell, or double a "
                'quote inside one ("")'
            ) from None


def _read_tsv(path: str) -> pa.Table:
    with open(path, newline="", encoding="utf-8-sig") as file:
        # One line a row: split at "\n" alone (a "\r" inside a cell is text; "\r\n" ends a line).
        lines = file.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line break
    rows = ((number, line.removesuffix("\r")) for number, line in enumerate(lines, 1))
    return _text_table(path, ((n, line.split("\t") if line else []) for n, line in rows))


def _numbered(reader: Iterator[list[str]], line: Callable[[], int]) -> Iterator[tuple[int, list]]:
    for cells in reader:
        yield line(), cells


def _text_table(path: str, rows: Iterable[tuple[int, list[str]]]) -> pa.Table:
    """The table of a delimited file's rows (each with the number of the line it ends on):
    every cell text, an empty cell missing."""
    rows = iter(rows)
    header = next((cells for _, cells in rows if cells), None)
    if header is None:
        raise ValueError(f"{path}: the file is empty (no rows)")
    _check_header(path, header)
    columns: list[list[str | None]] = [[] for _ in header]
    for line, cells in rows:
        if not cells:
            continue  # a blank line
        if len(cells) != len(header):
            raise ValueError(
                f"{path}: line {line} (row {len(columns[0]) + 1}) has {len(cells)} field(s), the "
                f"header {len(header)}: a delimiter inside a cell must be quoted (CSV), or "
                "removed (TSV, which has no quoting)"
            )
        for column, cell in zip(columns, cells, strict=True):
            column.append(cell if cell != "" else None)
    return pa.table([pa.array(c, pa.string()) for c in columns], names=header)


def _check_header(path: str, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: the header names {', '.join(map(repr, repeated))} twice")


def _read_json(path: str) -> pa.Table:
    # `.json` is JSON Lines, or one array of objects (both are what datasets' json loader takes).
    with open(path, encoding="utf-8-sig") as file:
        text = file.read()
    if not text.lstrip().startswith("["):
        return read_json_lines(path, io.StringIO(text))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    return _json_table(path, ((n, row, "object") for n, row in enumerate(rows, 1)))


def _read_json_lines(path: str) -> pa.Table:
    with open(path, encoding="utf-8-sig") as file:
        return read_json_lines(path, file)


def read_json_lines(where: str, lines: Iterable[str]) -> pa.Table:
    """JSON Lines (one object a line) from a file or a stream; ``where`` names it in errors."""

    def objects() -> Iterator[tuple[int, object, str]]:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue  # a blank line
            try:
                yield number, json.loads(line), "line"
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: line {number} is not valid JSON: {err.msg}") from None

    return _json_table(where, objects())


def _json_table(where: str, objects: Iterable[tuple[int, object, str]]) -> pa.Table:
    columns: dict[str, list] = {}
    for rows, (number, row, unit) in enumerate(objects):
        if not isinstance(row, dict):
            raise ValueError(f'{where}: {unit} {number} is not a JSON object ({{"column": …}})')
        for name in row:
            if name not in columns:  # a key first seen here: missing in the rows before
                columns[name] = [None] * rows
        for name, column in columns.items():
            column.append(row.get(name))
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            kinds = sorted({type(v).__name__ for v in values if v is not None})
            raise ValueError(
                f"{where}: column {name!r} mixes kinds of values ({', '.join(kinds)}): give "
                "each column one kind"
            ) from None
    return pa.table(arrays) if arrays else pa.table({})


def _read_parquet(path: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot be read as Parquet: {reason}") from None


def first_row(mask: pa.ChunkedArray | pa.Array) -> int:
    return pc.index(mask, True).as_py() + 1  # rows counted from 1, the header not counted


def check_text(where: str, table: pa.Table, column: str) -> None:
    """Refuse a text column that holds no text, or empty or missing cells (``where`` names the
    file or split).

    Raises:
        ValueError: naming the column, the count and the first row.
    """
    values = plain(table[column])
    if pa.types.is_null(values.type):  # every cell missing (a JSON column of nulls)
        values = values.cast(pa.string())
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ValueError(f"{where}: text column {column!r} holds {values.type}, not text")
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    count = pc.sum(empty).as_py() or 0
    if count:
        raise ValueError(
            f"{where}: column {column!r} has {count} empty or missing text cell(s), the first "
            f"in row {first_row(empty)}"
        )


def plain(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Dictionary-encoded values (pandas' categoricals in Parquet) as their values."""
    kind = values.type
    return values.cast(kind.value_type) if pa.types.is_dictionary(kind) else values


# Each extension's reader: the one table of formats that training and `predict` share.
FILE_FORMATS: dict[str, Callable[[str], pa.Table]] = {
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".jsonl": _read_json_lines,
    ".json": _read_json,
    ".parquet": _read_parquet,
}
