"""`freelm eval`: zero-shot evaluation of a training run or a Hugging Face directory (the FreeLM authors'
layout, or a `freelm export-hf` export), on one process or a TP x DP grid of them.

Launched like training (torchrun, the deepspeed launcher, srun, or plain). The grid: when the world size is
a multiple of the checkpoint's TP degree, the model is built at that degree and each rank loads only its
own TP shard; the other world / TP ranks are data-parallel. Otherwise (one process included) every rank
loads the whole model (TP=1) and all ranks are data-parallel. Batches are dealt to the data-parallel ranks
and the scores gathered, so every grid gives the one-process numbers. Each rank runs on its own device: the
CUDA device of its local rank (NCCL) in the checkpoint's training precision, or the CPU (gloo) in fp32. A
Hugging Face directory loads whole (TP=1) on every rank; its propositions are cut to its positions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.tasks import Proposition, SplitStats, iter_propositions, load_tasks
from pipeline.errors import ConfigError, DataError
from pipeline.eval.metrics import TaskResult, task_result
from pipeline.eval.scoring import Batching, Placement, perplexity, score_propositions
from pipeline.eval.selection import select

BATCH_TOKENS = {"cuda": 32768, "cpu": 2048}  # default token budget per batch


@dataclass
class Evaluation:
    tasks: list[TaskResult]
    perplexity: float | None
    main: bool  # this process is global rank 0: the one that reports
    setup: str  # grid, device and precision, for the log
    examples_per_s: float


def grid_tp(world_size: int, checkpoint_tp: int) -> int:
    """The TP degree to evaluate at: the checkpoint's when it divides the world size, else 1."""
    return checkpoint_tp if world_size % checkpoint_tp == 0 else 1


def examples(props: Iterable[Proposition], limit: int | None = None) -> list[list[Proposition]]:
    """Propositions grouped by example (candidates in label order); the first `limit` examples when given
    (benchmarks; `freelm eval --limit` samples them with `select`)."""
    grouped: list[list[Proposition]] = []
    for prop in props:
        if grouped and grouped[-1][0].example_id == prop.example_id:
            grouped[-1].append(prop)
        elif limit is not None and len(grouped) == limit:
            break
        else:
            grouped.append([prop])
    return grouped


def evaluate_tasks(
    model, tokenizer, tasks_yaml: str | Path, split: str, max_len: int, placement: Placement, batching: Batching,
    only: Sequence[str] | None = None, limit: int | None = None, seed: int = 0,
) -> list[TaskResult]:
    """Every task declaring `split` (a sample of `limit` examples, drawn with `seed`, where it has more), all
    scored together."""
    specs = [spec for spec in load_tasks(tasks_yaml, only).values() if split in spec.splits]
    every = [examples(iter_propositions(spec, split, SplitStats(), all_candidates=True)) for spec in specs]
    tasks = [select(spec, split, groups, limit, seed) for spec, groups in zip(specs, every)]
    flat = [p for task in tasks for group in task.groups for p in group]
    candidates = [len(group) for task in tasks for group in task.groups for _ in group]
    if not flat:
        return []
    p_true, lm = score_propositions(model, tokenizer, flat, max_len, placement, batching, candidates)
    results, start = [], 0
    for spec, task in zip(specs, tasks):
        end = start + sum(len(group) for group in task.groups)
        results.append(task_result(spec, task, p_true[start:end], lm[start:end]))
        start = end
    return results


def evaluate_run(
    run_dir: str | Path, tasks_yaml: str | Path, split: str, only: Sequence[str] | None = None,
    limit: int | None = None, heldout: str | Path | None = None, batch_tokens: int | None = None, seed: int = 0,
    task_id: int | None = None,
) -> Evaluation:
    """A training run's latest checkpoint, or a Hugging Face directory (`task_id`: the authors' task whose head
    scores, default 0), scored on `split` by every process of the launch (each returns the same results: the
    `limit` samples are drawn alike), and the perplexity of `heldout` when given."""
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be at least 1, got {batch_tokens}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    from megatron.core import parallel_state as ps

    from pipeline.checkpoint.consolidate import tensor_parallel_degree
    from pipeline.eval.load import TASK_OPTION, checkpoint_kind, load_hf_dir, load_trained
    from pipeline.parallel.distributed import destroy_parallel, init_parallel, launch_env

    hf = checkpoint_kind(run_dir) == "hf"
    if task_id is not None and not hf:
        raise ConfigError(f"{TASK_OPTION} picks a task of a Hugging Face checkpoint in the FreeLM authors' layout; "
                          f"{run_dir} is a training run directory")
    checkpoint_tp = 1 if hf else tensor_parallel_degree(Path(run_dir) / "checkpoints")
    tp = grid_tp(launch_env().world_size, checkpoint_tp)
    launch = init_parallel(tp)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        main = launch.rank == 0
        started = time.perf_counter()
        if hf:
            model, tokenizer = load_hf_dir(run_dir, device, task_id)
            max_len = model.cfg.max_seq_len
        else:
            model, tokenizer, cfg = load_trained(run_dir, tp, device)
            max_len = cfg.data.seq_len
        dp = ps.get_data_parallel_world_size()
        dtype = str(model.embed.weight.dtype).removeprefix("torch.")
        setup = f"world {launch.world_size} = TP {tp} x DP {dp} (checkpoint TP {checkpoint_tp}); {device.type}, {dtype}"
        if main:
            print(f"eval: {setup}; model loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        placement = Placement(device, ps.get_data_parallel_rank(), dp, ps.get_data_parallel_group(), progress=main)
        batching = Batching(batch_tokens or BATCH_TOKENS[device.type])
        started = time.perf_counter()
        results = evaluate_tasks(model, tokenizer, tasks_yaml, split, max_len, placement, batching, only, limit, seed)
        rate = sum(r.n for r in results) / (time.perf_counter() - started)
        ppl = None
        if heldout:
            ids = np.asarray(tokenizer.encode(Path(heldout).read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
            try:
                ppl = perplexity(model, ids, max_len, placement, batching)
            except ValueError as err:
                raise DataError(f"{heldout}: {err}") from None
    finally:
        destroy_parallel()
    return Evaluation(results, ppl, main, setup, rate)
