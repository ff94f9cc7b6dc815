"""Raw text -> megatron-core indexed dataset (`PREFIX.bin` / `PREFIX.idx`), tokenized by worker processes.

A `.jsonl` file holds one document per line (its `text_field`); any other file is one plain-text document.
Plain text is cut into ~1 MiB pieces after a newline so that workers share large files; the pieces of a
document are joined again in order (newline is a piece of its own in trained tokenizers, so cutting after
one does not change the tokens). Every document ends with the tokenizer's eos id.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import DataError

PIECE_BYTES = 1 << 20
JSONL_BATCH = 256


@dataclass
class CorpusStats:
    documents: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class Piece:
    """A unit of work: texts in order; `last` marks the final piece of each text's document."""

    texts: list[str]
    last: list[bool]
    nbytes: int


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        for name in matched:
            if not Path(name).is_file():
                raise DataError(f"{name}: no such input file")
            files.append(Path(name))
    if not files:
        raise DataError(f"no input files match {list(patterns)}")
    return files


def read_pieces(files: Sequence[Path], text_field: str) -> Iterator[Piece]:
    for path in files:
        if path.suffix == ".jsonl":
            yield from jsonl_pieces(path, text_field)
        else:
            yield from text_pieces(path)


def text_pieces(path: Path) -> Iterator[Piece]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        chunk = f.read(PIECE_BYTES)
        while chunk:
            nxt = f.read(PIECE_BYTES)
            if nxt and not chunk.endswith("\n") and "\n" in nxt:
                cut = nxt.index("\n") + 1
                chunk, nxt = chunk + nxt[:cut], nxt[cut:]
            yield Piece([chunk], [not nxt], len(chunk))
            chunk = nxt


def jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            except (KeyError, TypeError):
                raise DataError(f"{path}:{line_no}: no {text_field!r} field") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: field {text_field!r} is not a string")
            texts.append(text)
            if len(texts) == JSONL_BATCH:
                yield Piece(texts, [True] * len(texts), sum(map(len, texts)))
                texts = []
    if texts:
        yield Piece(texts, [True] * len(texts), sum(map(len, texts)))


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode(piece: Piece) -> tuple[list[list[int]], Piece]:
    return _worker_tokenizer.encode_batch(piece.texts), piece


def build_corpus(
    inputs: Sequence[str], tokenizer_dir: str | Path, out_prefix: str | Path, text_field: str = "text", workers: int = 2
) -> CorpusStats:
    """Tokenize `inputs` (files or globs) with `workers` processes and write `out_prefix.{bin,idx}`."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(str(out_prefix)), dtype=dtype)
    documents = tokens = 0
    pending: list[np.ndarray] = []
    start = time.perf_counter()
    total_bytes = sum(f.stat().st_size for f in files)
    with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_dir),)) as pool, tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", mininterval=1.0
    ) as bar:
        for encoded, piece in pool.imap(_encode, read_pieces(files, text_field), chunksize=1):
            for ids, last in zip(encoded, piece.last):
                pending.append(np.asarray(ids, dtype=dtype))
                if last:
                    pending.append(np.asarray([tokenizer.special.eos], dtype=dtype))
                    doc = np.concatenate(pending)
                    builder.add_document(doc, [doc.size])
                    documents, tokens, pending = documents + 1, tokens + doc.size, []
            bar.update(piece.nbytes)
    builder.finalize(get_idx_path(str(out_prefix)))
    return CorpusStats(documents=documents, tokens=tokens, seconds=time.perf_counter() - start)
