"""A checkpoint as an inference model: a training run's (on a device, in a precision, whole or one TP shard),
or a Hugging Face directory's (whole): one in the FreeLM authors' layout or one written by `freelm export-hf`.

The model is built on the meta device (no random initialisation, no full-size fp32 copy) and its parameters
are then made from the checkpoint's tensors, cast and moved one at a time; tied parameters stay tied and
megatron-core's tensor-parallel attributes are kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.config import Config, load_config
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import ConfigError, DataError
from pipeline.model.config import ModelConfig
from pipeline.model.freelm import FreeLM
from pipeline.parallel.ds_config import DTYPES

HF_PRECISIONS = {"bfloat16": "bf16", "float16": "fp16"}  # config.json's dtype -> a training precision
TASK_OPTION = "--task-id"


def checkpoint_kind(path: str | Path) -> Literal["run", "hf"]:
    """"run": a training run directory (config.yaml); "hf": a Hugging Face model directory (config.json)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return "run"
    if (path / "config.json").is_file():
        return "hf"
    raise DataError(f"{path}: neither a training run directory (config.yaml + checkpoints/) nor a Hugging Face "
                    f"model directory (config.json)")


def eval_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast bf16 / fp16 there); on GPU the precision the run trained in."""
    return torch.float32 if device.type == "cpu" else DTYPES[precision]


def load_trained(run_dir: str | Path, tp: int = 1, device: torch.device | str = "cpu") -> tuple[FreeLM, Tokenizer, Config]:
    """The run's latest checkpoint in eval mode on `device`, in `eval_dtype`. `tp` 1: the whole model in this process (ZeRO partitions
    and TP shards merged); otherwise it must be the checkpoint's TP degree, and this process loads only its
    own TP rank's shard (megatron-core's grid must be initialised at that degree)."""
    from megatron.core import parallel_state

    from pipeline.checkpoint.consolidate import (
        consolidate, resolve_tag, tensor_parallel_degree, tp_shard_state, training_precision,
    )

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: not a training run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    device = torch.device(device)
    ckpt_dir, tag = resolve_tag(run_dir / "checkpoints")
    dtype = eval_dtype(training_precision(ckpt_dir, tag), device)
    if tp == 1:
        state = consolidate(ckpt_dir, cfg.model, tag)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=state["embed.weight"].shape[0], vocab_pad_multiple=0)
    elif tp == tensor_parallel_degree(ckpt_dir, tag):
        state = tp_shard_state(ckpt_dir, parallel_state.get_tensor_model_parallel_rank(), tag)
        model_cfg = cfg.model
    else:
        raise ValueError(f"{ckpt_dir / tag}: saved at TP={tensor_parallel_degree(ckpt_dir, tag)}; "
                         f"it loads whole (TP=1) or at its own degree, not at TP={tp}")
    with torch.device("meta"):
        model = FreeLM(model_cfg)
    place_parameters(model, state, device, dtype, ckpt_dir / tag)
    return model.eval(), load_tokenizer(cfg.data.tokenizer), cfg


def place_parameters(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                     source: Path) -> None:
    """Replace the (meta) parameters of `model` by `state`'s tensors, by `named_parameters()` name, on
    `device` in `dtype`, frozen. `state` is emptied as it goes, so at most one tensor is held twice."""
    made: dict[int, nn.Parameter] = {}
    for name, meta in model.named_parameters():
        if name not in state:
            raise DataError(f"{source}: no tensor {name!r} in the checkpoint")
        tensor = state.pop(name)
        if tensor.shape != meta.shape:
            raise DataError(f"{source}: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(meta.shape)}")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        param.__dict__.update(meta.__dict__)  # tensor_model_parallel, partition_dim, ...
        made[id(meta)] = param
    for module in model.modules():
        for key, meta in module._parameters.items():
            if meta is not None:
                module._parameters[key] = made[id(meta)]


def load_hf_dir(path: str | Path, device: torch.device | str = "cpu",
                task_id: int | None = None) -> tuple[FreeLM, Tokenizer]:
    """A Hugging Face directory, whole, in eval mode on `device` (fp32 on CPU, else config.json's dtype), and
    its tokenizer. The teacher head: task `task_id` (default 0) of the FreeLM authors' `mtc_head`, or the
    `teacher_head.safetensors` of a `freelm export-hf` directory."""
    from safetensors.torch import load_file

    from pipeline.hf.convert import model_config_from_hf
    from pipeline.hf.export import META_FILE, TEACHER
    from pipeline.hf.freelm_format import check_task, is_authors_layout
    from pipeline.hf.load import CheckpointReader, read_parameter

    path, device = Path(path), torch.device(device)
    try:
        reader = CheckpointReader(path)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    config, config_file = reader.config, path / "config.json"
    authors = is_authors_layout(config)
    if authors:
        task_id = 0 if task_id is None else task_id
        check_task(config, task_id, TASK_OPTION, config_file)
    elif task_id is not None:
        raise ConfigError(f"{TASK_OPTION} picks a task of a checkpoint in the FreeLM authors' layout; {config_file} "
                          f"has no num_multi_task_labels")
    elif not (path / META_FILE).is_file():
        raise DataError(f"{path}: no teacher head: neither the FreeLM authors' layout (num_multi_task_labels in "
                        f"config.json, mtc_head.weight) nor a `freelm export-hf` directory ({META_FILE})")
    try:
        shape = model_config_from_hf(config)
    except ValueError as err:
        raise DataError(f"{config_file}: {err}") from None
    try:
        tokenizer = load_tokenizer(path)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    rows, special = config["vocab_size"], tokenizer.special
    if max(special.sep, special.cls) >= rows:
        raise DataError(f"{path}: the tokenizer's [sep] / [cls] ids ({special.sep}, {special.cls}) are past the "
                        f"model's {rows} embedding rows (config.json vocab_size): the model never learned them")
    # ids past the checkpoint's rows (e.g. an added pad) get rows at the mean embedding, as `train.init_from` does
    cfg = ModelConfig(**shape, vocab_size=max(rows, tokenizer.vocab_size), vocab_pad_multiple=0)
    with torch.device("meta"):
        model = FreeLM(cfg)
    state = {}
    try:
        for name, _ in model.named_parameters():
            if name == TEACHER and not authors:
                teacher_file = path / json.loads((path / META_FILE).read_text())["teacher_head"]
                state[name] = load_file(str(teacher_file))["weight"]
            else:
                state[name] = read_parameter(reader, name, cfg, cfg.vocab_size, task_id or 0)
    except KeyError as err:
        raise DataError(err.args[0]) from None
    dtype = eval_dtype(HF_PRECISIONS.get(str(config.get("dtype", config.get("torch_dtype"))), "fp32"), device)
    place_parameters(model, state, device, dtype, path)
    return model.eval(), tokenizer
