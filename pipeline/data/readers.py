"""Corpus input formats, streamed as batches of records for the tokenizer workers.

Formats, told apart by name (suffixes compared in lower case):

- JSON lines: `.jsonl` or `.json`, optionally compressed (`.jsonl.gz`, `.json.gz`, `.jsonl.zst`,
  `.json.zst`): one object per line, the text in `text_field`; blank lines are ignored. A record is named
  by its line number, from 1: `file:LINE`.
- Parquet (`.parquet`): the `text_field` column, read one record batch at a time. A record is named by its
  row index, from 0 as in pandas and `datasets`: `file:row N`.
- A Hugging Face `datasets` directory written by `Dataset.save_to_disk` (memory-mapped Arrow), read in
  batches of rows, named `dir:row N`. A `DatasetDict` directory is an error that lists its splits.
- Plain text: any other file is one document, cut into ~1 MiB pieces after a newline so that workers share
  large files (newline is a piece of its own in trained tokenizers, so the cut does not change the tokens).

A directory that is not a saved dataset is walked recursively in sorted path order for the formats above;
there plain text means `.txt` files only (each one document, as when named), so READMEs, checksums, lock
files and names starting with "." are passed over. A saved dataset met inside is read as one source.
A file named twice (say by a directory and a glob) is read once, where it first appears.

Nothing holds a whole file: the main process reads a source and splits it into batches of at most
`BATCH_RECORDS` records or ~`BATCH_BYTES` of text; the workers parse and check the records (`batch_texts`).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import DataError

BATCH_BYTES = 1 << 20
BATCH_RECORDS = 1024
ZSTD_READ = 1 << 16
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")
WALKED_SUFFIXES = (".txt", ".parquet", *(name + z for name in JSON_SUFFIXES for z in ("", *COMPRESSED_SUFFIXES)))


@dataclass(frozen=True)
class Source:
    """One input: a file or a saved dataset directory. `kind` is "jsonl", "parquet", "dataset" or "text"."""

    path: Path
    kind: str
    size: int


@dataclass
class Batch:
    """Records of one source for one worker task. `kind` says what `records` hold: "json" (raw lines),
    "column" (str or None) or "piece" (one piece of a plain-text document; `ends_document` is False when the
    document goes on in the next batch). `errors` are problems the reader met (a corrupt stream)."""

    source: int
    path: str
    kind: str
    text_field: str
    records: list[Any]
    numbers: list[int]
    nbytes: int
    errors: list[str] = field(default_factory=list)
    ends_document: bool = True


class CorruptStream(Exception):
    """A compressed stream that cannot be decoded further; the message names the file and line."""


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files and saved-dataset directories named by `patterns` (paths, globs or directories), in order."""
    found: dict[Path, Path] = {}
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise DataError(f"{pattern}: matches no input files")
        for name in matched:
            path = Path(name)
            if path.is_dir():
                inside = [path] if is_saved_dataset(path) else list(walk(path))
                if not inside:
                    raise DataError(f"{path}: a directory with no corpus files ({', '.join(WALKED_SUFFIXES)})")
            elif path.is_file():
                inside = [path]
            else:
                raise DataError(f"{name}: no such input file or directory")
            for item in inside:
                found.setdefault(item.resolve(), item)
    return list(found.values())


def is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def walk(directory: Path) -> Iterator[Path]:
    """Corpus files under `directory` in sorted path order; saved datasets are yielded whole."""
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from [entry] if is_saved_dataset(entry) else walk(entry)
        elif entry.name.lower().endswith(WALKED_SUFFIXES):
            yield entry


def source_kind(path: Path) -> str:
    if path.is_dir():
        return "dataset"
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        if len(suffixes) == 2 and suffixes[0] in JSON_SUFFIXES:
            return "jsonl"
        raise DataError(f"{path}: only JSON lines are read compressed (.jsonl.gz, .json.gz, .jsonl.zst, .json.zst)")
    if suffixes and suffixes[-1] in JSON_SUFFIXES:
        return "jsonl"
    return "parquet" if suffixes and suffixes[-1] == ".parquet" else "text"


def open_sources(paths: Sequence[Path], text_field: str) -> list[Source]:
    """Sources for `paths`, with the structure of each checked up front (splits, columns, column types), so
    a wrong input fails before any tokenizing."""
    sources = []
    for path in paths:
        kind = source_kind(path)
        if kind == "parquet":
            _parquet_file(path, text_field)
        elif kind == "dataset":
            _load_dataset(path, text_field)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        sources.append(Source(path, kind, size))
    return sources


def read_batches(sources: Sequence[Source], text_field: str) -> Iterator[Batch]:
    """Every source's records in order, in batches; each source's batches' `nbytes` add up to its size."""
    readers = {"jsonl": _json_lines, "parquet": _parquet_rows, "dataset": _dataset_rows, "text": _text_pieces}
    for index, source in enumerate(sources):
        yield from readers[source.kind](index, source, text_field)


def batch_texts(batch: Batch) -> tuple[list[str], list[str]]:
    """The texts of a batch's good records, in order, and one message per bad record (then the reader's)."""
    if batch.kind == "piece":
        return batch.records, []
    texts, errors = [], []
    json_lines = batch.kind == "json"
    check = _json_text if json_lines else _column_text
    hint = " (.json files are read as JSON lines, one object per line)" if json_lines and batch.path.lower().endswith(
        (".json", ".json.gz", ".json.zst")) else ""
    for number, record in zip(batch.numbers, batch.records):
        text, problem = check(record, batch.text_field)
        if problem:
            errors.append(f"{batch.path}:{number}: {problem}{hint}" if json_lines
                          else f"{batch.path}:row {number}: {problem}")
        else:
            texts.append(text)
    return texts, errors + batch.errors


def _json_text(line: bytes, text_field: str) -> tuple[str, str]:
    """(text, "") for a good JSON line, ("", problem) for a bad one."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return "", f"not UTF-8 ({err.reason} at byte {err.start})"
    except json.JSONDecodeError as err:
        return "", f"invalid JSON ({err.msg})"
    if not isinstance(value, dict):
        return "", f"not a JSON object ({_json_type(value)})"
    if text_field not in value:
        return "", f"no {text_field!r} field"
    text = value[text_field]
    if not isinstance(text, str):
        return "", f"field {text_field!r} is not a string ({_json_type(text)})"
    return text, ""


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return names.get(type(value), "string")


def _column_text(value: str | None, text_field: str) -> tuple[str, str]:
    return ("", f"{text_field!r} is null") if value is None else (value, "")


def _batched(
    index: int, source: Source, kind: str, text_field: str, records: Iterable[tuple[int, Any]],
    position: Callable[[int], int],
) -> Iterator[Batch]:
    """Group numbered records into batches; `position(last number)` is how far into the source they reach.
    A CorruptStream ends the source with its message in the last batch's errors."""
    texts: list[Any] = []
    numbers: list[int] = []
    size = done = 0
    try:
        for number, record in records:
            texts.append(record)
            numbers.append(number)
            size += 0 if record is None else len(record)
            if len(texts) == BATCH_RECORDS or size >= BATCH_BYTES:
                at = position(number)
                yield Batch(index, str(source.path), kind, text_field, texts, numbers, at - done)
                texts, numbers, size, done = [], [], 0, at
        errors = []
    except CorruptStream as err:
        errors = [str(err)]
    yield Batch(index, str(source.path), kind, text_field, texts, numbers, source.size - done, errors)


def _json_lines(index: int, source: Source, text_field: str) -> Iterator[Batch]:
    compression = source.path.suffix.lower()
    with open(source.path, "rb") as raw:
        if compression == ".gz":
            stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")
        elif compression == ".zst":
            stream = io.BufferedReader(_ZstdFrames(raw), buffer_size=ZSTD_READ)
        else:
            stream = raw
        lines = _numbered_lines(stream, source.path, compression)
        yield from _batched(index, source, "json", text_field, lines, lambda _: raw.tell())


def _numbered_lines(stream: BinaryIO, path: Path, compression: str) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines, without their line break, and their numbers (from 1); a decoding failure becomes a
    CorruptStream."""
    import zstandard

    number = 0
    try:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line.rstrip(b"\r\n")
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as err:
        raise CorruptStream(f"{path}:{number + 1}: corrupt {compression.lstrip('.')} stream, the rest of the file "
                            f"cannot be read ({err})") from None


class _ZstdFrames(io.RawIOBase):
    """A `.zst` file as a readable stream, frame after frame, decoded by zstandard's decompressobj. A file that
    ends inside a frame is an error here (zstandard's stream_reader ends quietly at a truncation)."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame: Any = None
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if not self._decode_more():
                return 0
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _decode_more(self) -> bool:
        ended = self._frame is None or self._frame.eof
        chunk = (self._frame.unused_data if self._frame is not None and ended else b"") or self._raw.read(ZSTD_READ)
        if not chunk:
            if not ended:
                raise self._error("the file ends inside a zstd frame (truncated)")
            return False
        if ended:
            self._frame = self._dctx.decompressobj()
        self._out = memoryview(self._frame.decompress(chunk))
        return True


def _parquet_file(path: Path, text_field: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path}: no column {text_field!r}; its columns are {', '.join(schema.names)} (--text-field)")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not strings")
    return parquet


def _parquet_rows(index: int, source: Source, text_field: str) -> Iterator[Batch]:
    parquet = _parquet_file(source.path, text_field)
    batches = (b.column(0) for b in parquet.iter_batches(batch_size=BATCH_RECORDS, columns=[text_field]))
    rows = parquet.metadata.num_rows
    yield from _batched(index, source, "column", text_field, _numbered_rows(batches),
                        lambda row: (row + 1) * source.size // max(rows, 1))


def _load_dataset(path: Path, text_field: str) -> Any:
    """The saved Dataset at `path`, reduced to its text column."""
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())["splits"]
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; pass one split's directory, "
                        f"{path}/<split> (e.g. {path / splits[0]})")
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if text_field not in dataset.column_names:
        raise DataError(f"{path}: no column {text_field!r}; its columns are {', '.join(dataset.column_names)} "
                        "(--text-field)")
    feature = dataset.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{path}: column {text_field!r} holds {feature}, not strings")
    return dataset.select_columns([text_field])


def _dataset_rows(index: int, source: Source, text_field: str) -> Iterator[Batch]:
    dataset = _load_dataset(source.path, text_field)
    tables = (t.column(0) for t in dataset.with_format("arrow").iter(batch_size=BATCH_RECORDS))
    yield from _batched(index, source, "column", text_field, _numbered_rows(tables),
                        lambda row: (row + 1) * source.size // max(len(dataset), 1))


def _numbered_rows(columns: Iterable[Any]) -> Iterator[tuple[int, str | None]]:
    """The values of successive Arrow string columns, numbered from row 0."""
    row = 0
    for column in columns:
        for value in column.to_pylist():
            yield row, value
            row += 1


def _text_pieces(index: int, source: Source, text_field: str) -> Iterator[Batch]:
    """One document, as pieces of ~BATCH_BYTES characters that end after a newline where one follows."""
    with open(source.path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as f:
        done = 0
        chunk = f.read(BATCH_BYTES)
        while chunk:
            nxt = f.read(BATCH_BYTES)
            if nxt and not chunk.endswith("\n") and "\n" in nxt:
                cut = nxt.index("\n") + 1
                chunk, nxt = chunk + nxt[:cut], nxt[cut:] or f.read(BATCH_BYTES)
            at = raw.tell() if nxt else source.size
            yield Batch(index, str(source.path), "piece", text_field, [chunk], [0], at - done, ends_document=not nxt)
            chunk, done = nxt, at
