"""The two resumable streams: language batches and teacher batches, sharded over data-parallel ranks.

A stream walks one global order of sample indices. Each micro-step consumes `micro_batch * dp_size`
samples: data-parallel rank r takes the r-th slice, and every tensor-parallel rank of that data-parallel
rank takes the same one. The only state is `consumed_samples` (over all ranks), which the trainer saves in
checkpoints; a loader rebuilt from it yields exactly what an uninterrupted run would have yielded next.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.propositions import PropositionDataset
from pipeline.errors import ConfigError, DataError


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers start: a fork server, not a fork of the rank (a fork taken after the model exists
    shares every page of it copy-on-write, and each optimizer step would then duplicate them). The server imports
    the streams' modules once per rank, and each worker forks with them loaded, instead of importing torch and
    megatron-core's datasets again (~8 s of CPU a worker)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.data.loaders", "megatron.core.datasets.gpt_dataset",
                                    "megatron.core.datasets.blended_dataset"])
    return context


def init_worker(rank_pid: int, rank_started: float, worker_id: int) -> None:
    """Set up a loader worker of the rank `rank_pid` (started at `rank_started`).

    Workers ignore SIGTERM and SIGUSR1: SLURM sends them to every process of a job step, and the rank then stops
    after its current step with a checkpoint, shutting its workers down itself. Workers come from a fork server,
    so torch's own check (is my parent alive?) watches the server, which in turn lives as long as any worker does;
    a thread here watches the rank instead and ends the worker when the rank is gone, even SIGKILLed, so no
    orphan keeps the job's output open."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    threading.Thread(target=_exit_with_rank, args=(rank_pid, rank_started), daemon=True).start()


def _exit_with_rank(rank_pid: int, rank_started: float) -> None:
    while True:
        time.sleep(1.0)
        try:
            alive = psutil.Process(rank_pid).create_time() == rank_started
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            os._exit(1)


class EpochShuffled(Dataset):
    """An endless view of a dataset: sample i is item perm_e[i mod n] of epoch e = i // n, where perm_e is a
    permutation seeded by (*seed, e)."""

    def __init__(self, dataset: Any, seed: int | tuple[int, ...]):
        self.dataset, self.seed = dataset, (seed,) if isinstance(seed, int) else tuple(seed)
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' (a batch may straddle them)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.index(i)]

    def index(self, i: int) -> int:
        """The dataset item that sample i of the stream is."""
        epoch, pos = divmod(i, len(self.dataset))
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = np.random.default_rng([*self.seed, epoch]).permutation(len(self.dataset))
        return int(self._perms[epoch][pos])


class TaskBlend(Dataset):
    """An endless stream over several tasks' units in fixed shares of items. A unit is a run of consecutive
    items (`starts[u]` on; one proposition, or all candidates' propositions of one example), of one size per
    task. Every chunk of the stream holds `counts[j]` units of task j (its share of `chunk` items, at least
    one), in an order seeded by the chunk, each unit's items side by side; the k-th unit of task j is sample k
    of that task's own epoch-shuffled stream of units. A fixed function of the position, like
    `EpochShuffled`, so a resumed loader continues exactly."""

    def __init__(self, dataset: Any, tasks: np.ndarray, starts: np.ndarray, weights: dict[int, float], seed: int,
                 chunk: int = 4096):
        self.dataset, self.seed = dataset, seed
        unit_sizes = np.diff(starts, append=len(tasks))
        chosen = sorted(task for task, weight in weights.items() if weight > 0)
        total = sum(weights[task] for task in chosen)
        self.streams, sizes = [], []
        for task in chosen:
            units = np.flatnonzero(tasks[starts] == task)
            if len(set(unit_sizes[units].tolist())) > 1:
                raise DataError(f"{getattr(dataset, 'prefix', 'teacher data')}: task {task}'s examples have "
                                f"different numbers of propositions: {sorted(set(unit_sizes[units].tolist()))}")
            self.streams.append(EpochShuffled(starts[units], (seed, task)))
            sizes.append(int(unit_sizes[units[0]]))
        self.sizes = np.array(sizes)
        self.counts = np.array([max(1, round(chunk * weights[task] / total / size)) for task, size in zip(chosen, sizes)])
        self.per_chunk = int((self.counts * self.sizes).sum())  # items
        self._chunk, self._items = -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.index(i)]

    def index(self, i: int) -> int:
        chunk, pos = divmod(i, self.per_chunk)
        if chunk != self._chunk:
            order = np.random.default_rng([self.seed, chunk]).permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            drawn = np.empty_like(order)
            for j, count in enumerate(self.counts):
                drawn[order == j] = chunk * count + np.arange(count)
            first = np.array([self.streams[j][int(k)] for j, k in zip(order, drawn)], dtype=np.int64)
            sizes = self.sizes[order]
            within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            self._chunk, self._items = chunk, np.repeat(first, sizes) + within
        return int(self._items[pos])


class LengthGrouped(Dataset):
    """A stream reordered within windows of `window` groups of `group` samples (one optimizer step's, over
    all micro-batches and data-parallel ranks): each window's samples are sorted by length, cut into groups,
    and those are shuffled (seeded by the window), so a micro-batch holds similar lengths and pads little,
    and a step takes the same propositions however it is split into micro-batches. The reordering is a fixed
    function of the position, so a loader resumed at any micro-batch boundary continues exactly."""

    def __init__(self, stream: EpochShuffled | TaskBlend, lengths: np.ndarray, group: int, window: int, seed: int):
        self.stream, self.lengths, self.group, self.window, self.seed = stream, lengths, group, window, seed
        self._window, self._order = -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, i: int) -> Any:
        size = self.group * self.window
        window, pos = divmod(i, size)
        if window != self._window:
            first = window * size
            lengths = self.lengths[[self.stream.index(first + k) for k in range(size)]]
            by_length = np.argsort(lengths, kind="stable").reshape(self.window, self.group)
            shuffled = np.random.default_rng([self.seed, window]).permutation(self.window)
            self._window, self._order = window, by_length[shuffled].reshape(-1)
        return self.stream[window * size + int(self._order[pos])]


class _RankBatches:
    """Index lists of this rank's micro-batches, from `start` (global samples consumed) up to `total`."""

    def __init__(self, micro_batch: int, dp_rank: int, dp_size: int, start: int, total: int | None):
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.start, self.total = start, total

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch * self.dp_size
        first = self.start
        while self.total is None or first + step <= self.total:
            lo = first + self.dp_rank * self.micro_batch
            yield list(range(lo, lo + self.micro_batch))
            first += step


class StreamLoader:
    """Iterates this rank's micro-batches; `state_dict()` / `consumed_samples` restore the position."""

    def __init__(
        self,
        dataset: Any,
        collate: Callable[[list], dict[str, torch.Tensor]],
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        total_samples: int | None = None,
        num_workers: int = 0,
    ):
        self.dataset, self.collate = dataset, collate
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.consumed_samples, self.total_samples, self.num_workers = consumed_samples, total_samples, num_workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = _RankBatches(self.micro_batch, self.dp_rank, self.dp_size, self.consumed_samples, self.total_samples)
        loader = DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None, persistent_workers=False,
            multiprocessing_context=worker_context() if self.num_workers else None,
            worker_init_fn=(functools.partial(init_worker, os.getpid(), psutil.Process().create_time())
                            if self.num_workers else None),
        )
        for batch in loader:
            self.consumed_samples += self.micro_batch * self.dp_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = state["consumed_samples"]


def collate_language(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]),
        "targets": torch.stack([torch.as_tensor(s["labels"]) for s in samples]),
        "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]),
    }


def right_pad(sequences: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded to the longest sequence, and each sequence's length."""
    lengths = torch.tensor([len(ids) for ids in sequences])
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    return tokens, lengths


def collate_teacher(pad_id: int, samples: list[tuple[np.ndarray, int, int]]) -> dict[str, torch.Tensor]:
    """Right-pads propositions to the longest in the batch; `lengths` says where each one's [cls] is."""
    tokens, lengths = right_pad([ids for ids, _, _ in samples], pad_id)
    return {
        "tokens": tokens,
        "lengths": lengths,
        "labels": torch.tensor([label for _, label, _ in samples]),
        "tasks": torch.tensor([task for _, _, task in samples]),
    }


def teacher_loader(
    prefix: str, max_len: int, pad_id: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int,
    consumed_samples: int = 0, num_workers: int = 0, length_window: int = 1, grad_accum: int = 1,
    task_weights: dict[str, float] | None = None, whole_examples: bool = False,
) -> StreamLoader:
    """Endless, reshuffled each epoch; drawn from the tasks in the shares of `task_weights` (task name ->
    weight; None: as the data holds them), with all candidates of an example side by side if `whole_examples`;
    grouped by length over windows of `length_window` steps of `grad_accum` micro-batches."""
    propositions = PropositionDataset(prefix, max_len)
    tasks, lengths = propositions.meta["task"], propositions.lengths()
    if task_weights is None and not whole_examples:
        dataset = EpochShuffled(propositions, seed)
    else:
        if task_weights is None:
            task_weights = task_propositions(propositions.summary)
        starts = np.arange(len(tasks))
        if whole_examples:
            example = propositions.meta["example"]
            starts = np.flatnonzero(np.r_[True, (tasks[1:] != tasks[:-1]) | (example[1:] != example[:-1])])
            # An example's propositions sort as one, by the longest, so length grouping keeps them together.
            lengths = np.repeat(np.maximum.reduceat(lengths, starts), np.diff(starts, append=len(tasks)))
        dataset = TaskBlend(propositions, tasks, starts, task_ids(propositions, task_weights), seed)
    if length_window > 1:
        group = micro_batch * grad_accum * dp_size
        dataset = LengthGrouped(dataset, lengths, group, length_window, seed)
    return StreamLoader(dataset, functools.partial(collate_teacher, pad_id), micro_batch, dp_rank, dp_size, consumed_samples,
                        num_workers=num_workers)


def task_ids(propositions: PropositionDataset, weights: dict[str, float]) -> dict[int, float]:
    """`data.teacher_task_weights` by task id; every task of the data must be named (0 leaves one out)."""
    tasks = {name: info["id"] for name, info in propositions.summary["tasks"].items()}
    where = f"data.teacher_task_weights (the tasks of {propositions.prefix}: {', '.join(tasks)})"
    if unknown := sorted(set(weights) - set(tasks)):
        raise ConfigError(f"{where}: no task {', '.join(unknown)} in the data")
    if missing := [name for name in tasks if name not in weights]:
        raise ConfigError(f"{where}: no weight for {', '.join(missing)} (0 leaves a task out)")
    if any(weight < 0 for weight in weights.values()) or not any(weight > 0 for weight in weights.values()):
        raise ConfigError(f"{where}: weights must be >= 0 and one of them > 0, got {weights}")
    return {tasks[name]: float(weight) for name, weight in weights.items()}


def task_propositions(summary: dict[str, Any]) -> dict[str, int]:
    """Propositions per task, by name, from a propositions summary (`<prefix>.summary.json`)."""
    return {name: info["propositions"] for name, info in summary["tasks"].items()}


def teacher_mix(prefix: str, weights: dict[str, float] | None) -> str:
    """The start-up log's line on the teacher data: its propositions and the share drawn from each task."""
    tasks = task_propositions(json.loads(Path(f"{prefix}.summary.json").read_text()))
    shares = weights or tasks
    total = sum(shares.values())
    drawn = ", ".join(f"{name} {shares[name] / total:.1%}" for name in tasks)
    return (f"teacher data: {sum(tasks.values()):,} propositions of {len(tasks)} tasks; drawn {drawn} "
            f"({'data.teacher_task_weights' if weights else 'as the data holds them'})")


def language_loader(
    dataset: Dataset, micro_batch: int, dp_rank: int, dp_size: int, consumed_samples: int = 0, num_workers: int = 0,
) -> StreamLoader:
    """Over a `language_dataset` (already shuffled and blended), to its end."""
    return StreamLoader(dataset, collate_language, micro_batch, dp_rank, dp_size, consumed_samples,
                        total_samples=len(dataset), num_workers=num_workers)
