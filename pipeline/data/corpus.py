"""Corpus files -> megatron-core indexed dataset (`PREFIX.bin` / `PREFIX.idx`), tokenized by worker processes.

`readers` streams the inputs (JSON lines, plain or `.gz` / `.zst`; Parquet; saved `datasets`; plain text) as
batches of ~1 MiB or 1024 records, one source after another. The main process only reads and splits; a
spawn pool parses, checks and tokenizes the batches, with at most `IN_FLIGHT x workers` batches queued (so
memory stays bounded however fast the reading is), and the results are written in input order. The output
therefore depends neither on the number of workers nor on the format the records came in. Every document
ends with the tokenizer's eos id.

A malformed record stops the build with a DataError naming `file:LINE` (JSON lines) or `file:row N`
(Parquet, datasets) and removes the partial output; with `on_error="skip"` it is left out and counted per
file. A corrupt compressed stream counts as one bad record and ends that file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np

from pipeline.data.readers import Batch, batch_texts, expand_inputs, open_sources, read_batches
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import ConfigError, DataError
from pipeline.progress import progress

IN_FLIGHT = 4
ON_ERROR = ("fail", "skip")


@dataclass
class CorpusStats:
    """What a build wrote; `skipped` maps a file to its count of skipped records, `first_skipped` to the
    message of the first."""

    documents: int
    tokens: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    first_skipped: dict[str, str] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def skipped_records(self) -> int:
        return sum(self.skipped.values())


@dataclass
class Encoded:
    """A batch's token ids (good records only, as arrays of the corpus dtype: cheap to send back), its bad
    records' messages, and the file it came from."""

    path: str
    ids: list[np.ndarray]
    errors: list[str]
    nbytes: int
    ends_document: bool


_worker_tokenizer: Tokenizer | None = None
_worker_dtype: type = np.int32


def _init_worker(tokenizer_dir: str, dtype: type) -> None:
    global _worker_tokenizer, _worker_dtype
    # One tokenizer thread per worker: the workers are the parallelism (Hugging Face's would oversubscribe).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer, _worker_dtype = load_tokenizer(tokenizer_dir), dtype


def _encode(batch: Batch) -> Encoded:
    texts, errors = batch_texts(batch)
    ids = [np.asarray(x, dtype=_worker_dtype) for x in _worker_tokenizer.encode_batch(texts)] if texts else []
    return Encoded(batch.path, ids, errors, batch.nbytes, batch.ends_document)


def _in_order(pool: Pool, batches: Iterable[Batch], window: int) -> Iterator[Encoded]:
    """`_encode` over `batches` in the pool, results in input order, at most `window` batches queued."""
    queued: deque = deque()
    for batch in batches:
        queued.append(pool.apply_async(_encode, (batch,)))
        if len(queued) >= window:
            yield queued.popleft().get()
    while queued:
        yield queued.popleft().get()


def build_corpus(
    inputs: Sequence[str], tokenizer_dir: str | Path, out_prefix: str | Path, text_field: str = "text",
    workers: int = 2, on_error: str = "fail",
) -> CorpusStats:
    """Tokenize `inputs` (files, globs or directories; formats in `readers`) with `workers` processes and
    write `out_prefix.{bin,idx}`. `on_error` is "fail" or "skip" (malformed records)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error: {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if workers < 1:
        raise ConfigError(f"workers: {workers} (need at least 1)")
    sources = open_sources(expand_inputs(inputs), text_field)
    tokenizer = load_tokenizer(tokenizer_dir)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    bin_path = Path(get_bin_path(str(out_prefix)))
    builder = IndexedDatasetBuilder(str(bin_path), dtype=dtype)
    stats = CorpusStats(documents=0, tokens=0, seconds=0.0)
    pending: list[np.ndarray] = []
    eos = np.asarray([tokenizer.special.eos], dtype=dtype)
    start = time.perf_counter()
    try:
        with mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_dir), dtype)) as pool, progress(
            total=sum(s.size for s in sources), unit="B", unit_scale=True, desc="tokenizing", mininterval=1.0
        ) as bar:
            for result in _in_order(pool, read_batches(sources, text_field), IN_FLIGHT * workers):
                if result.errors:
                    if on_error == "fail":
                        raise DataError(result.errors[0])
                    stats.skipped[result.path] = stats.skipped.get(result.path, 0) + len(result.errors)
                    stats.first_skipped.setdefault(result.path, result.errors[0])
                for k, ids in enumerate(result.ids):
                    pending.append(ids)
                    if result.ends_document or k < len(result.ids) - 1:
                        doc = np.concatenate([*pending, eos])
                        builder.add_document(doc, [doc.size])
                        stats.documents, stats.tokens, pending = stats.documents + 1, stats.tokens + doc.size, []
                bar.update(result.nbytes)
    except BaseException:
        builder.data_file.close()
        bin_path.unlink(missing_ok=True)
        raise
    builder.finalize(get_idx_path(str(out_prefix)))
    stats.seconds = time.perf_counter() - start
    return stats
