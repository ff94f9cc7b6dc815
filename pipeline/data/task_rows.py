"""Reading a task's data file as rows: tsv, csv, JSON lines or one regex match per line, each row tagged with
the physical line it starts on; a row that does not fit becomes a `RowError` in its place (the caller fails
or skips it), a bad header raises DataError at once."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.data.tasks import TaskSpec


class RowError(Exception):
    """A row that does not fit its declaration; the message is the reason counted when skipping."""


class _Lines:
    """A file's physical lines, decoded one at a time so that an undecodable byte is pinned to its line."""

    def __init__(self, path: Path, encoding: str):
        self.path, self.encoding = path, encoding
        self.number = 0
        self.decode_error: tuple[int, RowError] | None = None

    def __iter__(self) -> Iterator[str]:
        with self.path.open("rb") as f:
            for self.number, raw in enumerate(f, 1):
                try:
                    text = raw.decode(self.encoding)
                except UnicodeDecodeError as err:
                    reason = f"cannot decode byte {raw[err.start]:#04x} as {self.encoding}"
                    self.decode_error = self.decode_error or (self.number, RowError(reason))
                    text = raw.decode(self.encoding, errors="replace")
                yield text.removeprefix("\ufeff") if self.number == 1 else text

    def take_decode_error(self) -> tuple[int, RowError] | None:
        error, self.decode_error = self.decode_error, None
        return error


_Record = tuple[int, dict[str, Any] | RowError]  # (physical line where the row starts, row or problem)


def records(spec: TaskSpec, path: Path) -> Iterator[_Record]:
    lines = _Lines(path, spec.encoding)
    read = {"tsv": _table_rows, "csv": _table_rows, "jsonl": _jsonl_rows, "regex": _regex_rows}[spec.format]
    for record in read(spec, lines):
        yield lines.take_decode_error() or record


def _table_rows(spec: TaskSpec, lines: _Lines) -> Iterator[_Record]:
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if spec.format == "tsv" else {}
    reader = csv.reader(lines, **dialect)
    columns = spec.columns
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield start, RowError(f"unreadable {spec.format} row: {err}")
            continue
        if not cells:
            continue
        if columns is None:
            columns = tuple(cells)
            _check_header(spec, lines, columns)
        elif len(cells) != len(columns):
            yield start, RowError(f"expected {len(columns)} columns, got {len(cells)}")
        else:
            yield start, dict(zip(columns, cells))


def _check_header(spec: TaskSpec, lines: _Lines, columns: tuple[str, ...]) -> None:
    """A bad header spoils the whole file, so it always raises."""
    error = lines.take_decode_error()
    if error:
        raise DataError(f"{lines.path}:{error[0]}: header: {error[1]}")
    for name in spec.fields:
        if name not in columns:
            raise DataError(
                f"{lines.path}:{lines.number}: header has no column {name!r} (columns: {', '.join(columns)})")


def _jsonl_rows(spec: TaskSpec, lines: _Lines) -> Iterator[_Record]:
    for text in lines:
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            yield lines.number, RowError(f"invalid JSON: {err.msg}")
        else:
            yield lines.number, _text_values(row) if isinstance(row, dict) else RowError("expected a JSON object")


def _text_values(row: dict[str, Any]) -> dict[str, str | None]:
    """JSON values as text, like every other format's fields; null stays None (a missing field)."""
    return {key: value if value is None or isinstance(value, str) else str(value) for key, value in row.items()}


def _regex_rows(spec: TaskSpec, lines: _Lines) -> Iterator[_Record]:
    for text in lines:
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        match = spec.pattern.fullmatch(text)
        yield lines.number, match.groupdict() if match else RowError("line does not match the task's pattern")
