"""A training run's checkpoint as an inference model: on a device, in a precision, whole or one TP shard.

The model is built on the meta device (no random initialisation, no full-size fp32 copy) and its parameters
are then made from the checkpoint's tensors, cast and moved one at a time; tied parameters stay tied and
megatron-core's tensor-parallel attributes are kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config, load_config
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import DataError
from pipeline.model.freelm import FreeLM

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def eval_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no fast bf16 / fp16 there); on GPU the precision the run trained in."""
    return torch.float32 if device.type == "cpu" else PRECISIONS.get(precision, torch.float32)


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
