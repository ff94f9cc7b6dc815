"""Teacher-signal propositions, tokenized and stored on disk.

`build_propositions` writes, for one split of the tasks in a tasks YAML:
  OUT/SPLIT.bin, OUT/SPLIT.idx   megatron-core indexed dataset, one token sequence per proposition:
                                 input ids, then the ids of " [sep] <proposition> [cls]"
  OUT/SPLIT.meta.npy             per proposition: label (1 true / 0 false), task id, example id,
                                 candidate index, input length (where the proposition starts)
  OUT/SPLIT.summary.json         per task: id, label names, examples, propositions, positives,
                                 skipped (and why), truncated
Sequences longer than `max_len` lose tokens from the end of the input, never from the proposition;
`PropositionDataset` applies the same rule again for a shorter training context.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
from pipeline.progress import progress

from pipeline.data.tasks import Proposition, SplitStats, iter_propositions, load_tasks
from pipeline.data.tokenizer import CLS, SEP, Tokenizer, load_tokenizer
from pipeline.errors import DataError

META_DTYPE = np.dtype([("label", "u1"), ("task", "u2"), ("example", "i8"), ("candidate", "u1"), ("input_len", "i4")])
ENCODE_BATCH = 1024


def proposition_tail(proposition_text: str) -> str:
    return f" {SEP} {proposition_text} {CLS}"


def truncate(ids: np.ndarray, input_len: int, max_len: int) -> np.ndarray:
    """Drop tokens from the end of the input so that input + proposition fit in `max_len`."""
    excess = len(ids) - max_len
    if excess <= 0:
        return ids
    if excess > input_len:
        raise DataError(f"a proposition of {len(ids) - input_len} tokens does not fit in {max_len}")
    return np.concatenate([ids[: input_len - excess], ids[input_len:]])


def encode_with_tail(
    tokenizer: Tokenizer, inputs: Sequence[str], tails: Sequence[str], max_len: int, dtype: type = np.int64
) -> list[tuple[np.ndarray, int, bool]]:
    """Each input's ids followed by its tail's ids, cut to `max_len` from the input side: (ids, tail length,
    whether it was cut)."""
    heads, ends = tokenizer.encode_batch(inputs), tokenizer.encode_batch(tails)
    return [(truncate(np.asarray(h + t, dtype=dtype), len(h), max_len), len(t), len(h) + len(t) > max_len)
            for h, t in zip(heads, ends)]


def build_propositions(
    tasks_yaml: str | Path,
    split: str,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    only: Sequence[str] | None = None,
    max_len: int = 1024,
    seed: int = 0,
    all_candidates: bool = False,
) -> dict[str, dict]:
    """Tokenize the split of every task that declares it; returns the per-task summary it writes."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    specs = load_tasks(tasks_yaml, only)
    tokenizer = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = str(out / split)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    meta: list[np.ndarray] = []
    summary: dict[str, dict] = {}
    chosen = [spec for spec in specs.values() if split in spec.splits]
    if not chosen:
        raise DataError(f"{tasks_yaml}: no task declares a {split!r} split")
    for task_id, spec in enumerate(chosen):
        stats = SplitStats()
        truncated = 0
        stream = iter_propositions(spec, split, stats, seed=seed, all_candidates=all_candidates)
        for batch in _batches(progress(stream, desc=f"{spec.name}/{split}", unit=" props", mininterval=1.0)):
            rows, over = _encode(batch, tokenizer, spec.label_names, task_id, max_len, dtype, builder)
            meta.append(rows)
            truncated += over
        summary[spec.name] = dict(id=task_id, labels=list(spec.label_names), **asdict(stats), truncated=truncated)
    builder.finalize(get_idx_path(prefix))
    np.save(f"{prefix}.meta.npy", np.concatenate(meta) if meta else np.zeros(0, META_DTYPE))
    report = dict(split=split, tokenizer=str(tokenizer_dir), max_len=max_len, tasks=summary)
    Path(f"{prefix}.summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return summary


def _batches(stream, size: int = ENCODE_BATCH):
    batch: list[Proposition] = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(
    batch: list[Proposition], tokenizer: Tokenizer, label_names: tuple[str, ...], task_id: int,
    max_len: int, dtype: type, builder,
) -> tuple[np.ndarray, int]:
    encoded = encode_with_tail(tokenizer, [p.input_text for p in batch],
                               [proposition_tail(p.proposition_text) for p in batch], max_len, dtype)
    rows = np.zeros(len(batch), META_DTYPE)
    truncated = 0
    for i, (prop, (ids, tail_len, cut)) in enumerate(zip(batch, encoded)):
        truncated += cut
        builder.add_document(ids, [ids.size])
        rows[i] = (prop.label, task_id, prop.example_id, label_names.index(prop.candidate), len(ids) - tail_len)
    return rows, truncated


class PropositionDataset:
    """Read side: item i -> (token ids cut to `max_len` from the input side, label, task id)."""

    def __init__(self, prefix: str | Path, max_len: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.tokens = IndexedDataset(self.prefix)
        self.meta = np.load(f"{self.prefix}.meta.npy")
        self.summary = json.loads(Path(f"{self.prefix}.summary.json").read_text())
        self.max_len = max_len
        if len(self.tokens) != len(self.meta):
            raise DataError(f"{self.prefix}: {len(self.tokens)} sequences but {len(self.meta)} metadata rows")

    def __len__(self) -> int:
        return len(self.meta)

    def lengths(self) -> np.ndarray:
        """Each item's length in tokens, as `__getitem__` returns it."""
        return np.minimum(self.tokens.sequence_lengths, self.max_len)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        row = self.meta[i]
        ids = truncate(self.tokens[i], int(row["input_len"]), self.max_len)
        return ids, int(row["label"]), int(row["task"])
