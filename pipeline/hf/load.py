"""Start training from a local Hugging Face GPT-2 (or LLaMA) checkpoint directory (`train.init_from`).

Weights are read one tensor at a time from the checkpoint's safetensors (or `pytorch_model.bin`), converted
to FreeLM's layout, cut to this rank's tensor-parallel shard and, under ZeRO-3, written into the partitioned
parameters one module at a time (`deepspeed.zero.GatheredParameters`), so no rank ever holds the whole
model. Under ZeRO-3 only rank 0 of the group the parameters are partitioned over (the data-parallel group)
reads: the gather keeps that rank's values and hands them to the others, so the checkpoint is read once per
tensor-parallel rank. Unpartitioned parameters (ZeRO 0-2, where every rank holds its TP shard whole) are read
on every rank. The teacher head keeps its fresh initialisation, unless the checkpoint is in the FreeLM authors'
layout (`pipeline.hf.freelm_format`): then it is the chosen task's slice of their `mtc_head`
(`train.init_teacher_task`). It is replicated on the TP ranks, so each TP rank writes it whole.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError, DataError
from pipeline.hf.convert import BLOCK_OF_MODEL_TYPE, from_hf, model_config_from_hf
from pipeline.hf.export import TEACHER
from pipeline.hf.freelm_format import MTC_HEAD, check_task, is_authors_layout, teacher_from_mtc
from pipeline.model.config import ModelConfig
from pipeline.parallel.tensor_parallel import shard

TASK_KEY = "train.init_teacher_task"


class CheckpointReader:
    """Tensors of a Hugging Face checkpoint directory by name, read lazily. Names are accepted with or
    without the base-model prefix (`transformer.`, `model.`), as checkpoints of either kind exist."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bytes_read = 0
        self.config = json.loads((self.path / "config.json").read_text())
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.files = {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.path / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.path / "model.safetensors")
        elif (self.path / "pytorch_model.bin").exists():
            self.files = {}
            self.state = torch.load(self.path / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors(.index.json) or pytorch_model.bin")

    def __call__(self, name: str) -> torch.Tensor:
        for key in (name, name.split(".", 1)[1]):
            if key in self.files:
                from safetensors import safe_open

                with safe_open(str(self.files[key]), framework="pt") as f:
                    return self._count(f.get_tensor(key))
            if not self.files and key in self.state:
                return self._count(self.state[key])
        raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor.float()


def read_parameter(reader: CheckpointReader, name: str, cfg: ModelConfig, rows: int, teacher_task: int) -> torch.Tensor:
    """The full FreeLM tensor `name` from the checkpoint: the LM's through `from_hf` (`rows`: the embedding's
    padded vocab), the teacher head from the authors' `mtc_head`, task `teacher_task` (checked beforehand)."""
    if name != TEACHER:
        return from_hf(BLOCK_OF_MODEL_TYPE[reader.config["model_type"]], name, reader, cfg, rows)
    try:
        mtc = reader(MTC_HEAD)
    except KeyError:
        raise DataError(f"{reader.path}: config.json names tasks (FreeLM authors' layout) but the checkpoint has "
                        f"no {MTC_HEAD!r}") from None
    return teacher_from_mtc(mtc, reader.config, teacher_task, reader.path / "config.json")


def check_compatible(model: ModelConfig, path: str | Path, teacher_task: int = 0) -> None:
    """ConfigError naming every `model.*` key that disagrees with the checkpoint's config.json, or a
    `teacher_task` that is not a binary task of a checkpoint in the authors' layout."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise ConfigError(f"train.init_from: {config_file} not found (a Hugging Face model directory is expected)")
    try:
        expected = model_config_from_hf(json.loads(config_file.read_text()))
    except ValueError as err:
        raise ConfigError(f"train.init_from: {config_file}: {err}") from None
    ours = {key: getattr(model, key) for key in expected} | {"ffn_hidden": model.ffn_size}
    wrong = {k: v for k, v in expected.items() if k != "max_seq_len" and ours[k] != v}
    if model.max_seq_len > expected["max_seq_len"]:
        wrong["max_seq_len"] = f"<= {expected['max_seq_len']}"
    config = json.loads(config_file.read_text())
    if is_authors_layout(config):
        check_task(config, teacher_task, TASK_KEY, config_file)
    elif teacher_task != 0:
        raise ConfigError(f"{TASK_KEY}={teacher_task} picks a task of a checkpoint in the FreeLM authors' layout; "
                          f"{config_file} has no num_multi_task_labels (the teacher head starts fresh)")
    hf_vocab = config["vocab_size"]
    if model.vocab_size < hf_vocab:
        wrong["vocab_size"] = f">= {hf_vocab}"
    if wrong:
        found = ", ".join(f"model.{k}={ours.get(k, getattr(model, k))}" for k in wrong)
        needed = " ".join(f"model.{k}={v}" for k, v in wrong.items())
        raise ConfigError(f"train.init_from: {path} does not fit {found}; set {needed}")


@dataclass
class ImportStats:
    """What `load_hf_weights` did on this rank: parameter tensors set, checkpoint bytes read, seconds taken,
    and where the teacher head came from."""

    tensors: int
    bytes_read: int
    seconds: float
    teacher: str

    def __str__(self) -> str:
        return (f"imported {self.tensors} tensors, {self.bytes_read / 1e9:.2f} GB read in {self.seconds:.1f} s; "
                f"teacher head {self.teacher}")


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | Path, tp_group: dist.ProcessGroup | None,
                    teacher_task: int = 0) -> ImportStats:
    """Copy a Hugging Face checkpoint into `model` (a FreeLM, possibly TP-sharded and ZeRO-3 partitioned); the
    teacher head too from one in the authors' layout (its task `teacher_task`, checked by `check_compatible`).
    Collective under ZeRO-3: every rank of the model calls it."""
    import deepspeed

    start = time.perf_counter()
    reader = CheckpointReader(path)
    authors = is_authors_layout(reader.config)
    skipped = () if authors else (TEACHER,)
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    world_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    seen: set[int] = set()
    loaded = 0
    for prefix, module in model.named_modules():
        params = [(f"{prefix}.{n}".lstrip("."), p) for n, p in module.named_parameters(recurse=False)
                  if id(p) not in seen]
        params = [(name, p) for name, p in params if name not in skipped]
        if not params:
            continue
        seen.update(id(p) for _, p in params)
        partitioned = any(hasattr(p, "ds_id") for _, p in params)
        # modifier_rank is a rank of the parameters' own (data-parallel) group: only its values survive the gather
        reads = not partitioned or dist.get_rank(params[0][1].ds_process_group) == 0
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0, enabled=partitioned):
            for name, param in params:
                if reads:
                    full = read_parameter(reader, name, model.cfg, model.vocab_size, teacher_task)
                    param.data.copy_(shard(full, param, rank, world_size))  # the teacher head: not sharded, whole
                loaded += 1
    teacher = f"from {MTC_HEAD}, task {teacher_task}" if authors else "fresh"
    return ImportStats(loaded, reader.bytes_read, time.perf_counter() - start, teacher)
