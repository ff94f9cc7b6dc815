"""The FreeLM authors' checkpoint layout: the `FreeLMModel` of their released `modeling_freelm.py`.

A transformers GPT-2 (`transformer.*`; `lm_head.weight`, tied, may be absent) plus a multi-task classifier
`mtc_head.weight` of shape (tasks, n_embd, largest class count), bias-free: task t's logits are
`h @ mtc_head.weight[t]` on the final-norm hidden state `h` of the last real token, class 1 meaning "true".
config.json is a `GPT2Config` with `num_multi_task_labels`, the class count of each task as a comma-separated
string ("2" in the released model). FreeLM's teacher head (2, d_model) is a binary task's slice, transposed:
`mtc_head.weight[t][:, :2] == teacher_head.weight.T`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import ConfigError, DataError

TASKS_KEY = "num_multi_task_labels"
MTC_HEAD = "mtc_head.weight"


def is_authors_layout(config: dict) -> bool:
    """Whether a Hugging Face config.json is in the authors' layout (it names the tasks' class counts)."""
    return TASKS_KEY in config


def task_classes(config: dict, source: Path) -> list[int]:
    """The class count of each task, from config.json's `num_multi_task_labels` (e.g. "2" or "3,2")."""
    text = str(config[TASKS_KEY])
    try:
        classes = [int(part) for part in text.split(",")]
    except ValueError:
        classes = []
    if not classes or min(classes) < 1:
        raise DataError(f"{source}: {TASKS_KEY} must be comma-separated class counts, e.g. \"2\" or \"3,2\"; "
                        f"got {text!r}")
    return classes


def check_task(config: dict, task: int, key: str, source: Path) -> None:
    """ConfigError naming `key` unless `task` is a binary task of the checkpoint (FreeLM's teacher head is
    true/false)."""
    classes = task_classes(config, source)
    if not 0 <= task < len(classes):
        raise ConfigError(f"{key}={task}: {source} has {len(classes)} task(s) ({TASKS_KEY}: "
                          f"{config[TASKS_KEY]!r}); choose 0..{len(classes) - 1}")
    if classes[task] != 2:
        binary = [t for t, count in enumerate(classes) if count == 2]
        raise ConfigError(f"{key}={task}: task {task} of {source} has {classes[task]} classes ({TASKS_KEY}: "
                          f"{config[TASKS_KEY]!r}); FreeLM's teacher head is binary (true/false), choose one of "
                          f"the 2-class tasks: {binary or 'none'}")


def teacher_from_mtc(mtc: torch.Tensor, config: dict, task: int, source: Path) -> torch.Tensor:
    """FreeLM's teacher head weight (2, d_model) from the authors' `mtc_head.weight`, task `task`."""
    classes = task_classes(config, source)
    if mtc.dim() != 3 or mtc.shape[0] != len(classes) or mtc.shape[2] < max(classes):
        raise DataError(f"{source}: {MTC_HEAD} has shape {tuple(mtc.shape)}; {TASKS_KEY} {config[TASKS_KEY]!r} "
                        f"needs ({len(classes)}, n_embd, {max(classes)})")
    return mtc[task, :, :2].t().contiguous()


def mtc_from_teacher(teacher: torch.Tensor) -> torch.Tensor:
    """The authors' one-task `mtc_head.weight` (1, d_model, 2) holding FreeLM's teacher head (2, d_model)."""
    return teacher.t().unsqueeze(0).contiguous()
