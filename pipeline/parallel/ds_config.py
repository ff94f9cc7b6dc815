"""The DeepSpeed JSON of a run, read without importing DeepSpeed (the planner reads it too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError

RECIPE_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "train_batch_size": "train.micro_batch x train.grad_accum x data-parallel size",
}


def deepspeed_config(path: str | Path, micro_batch: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
    """Read a DeepSpeed JSON (precision, ZeRO stage, offload) and fill in the batch geometry and clipping,
    which come from the recipe alone: a JSON that sets them is an error, not a second source of truth."""
    try:
        ds_config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.ds_config: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON: {err}") from None
    for key, source in RECIPE_KEYS.items():
        if key in ds_config:
            raise ConfigError(f"{path} sets {key!r}; it comes from the recipe ({source})")
    ds_config.update(
        train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum, gradient_clipping=grad_clip
    )
    if zero_stage(ds_config) == 3:
        # DeepSpeed otherwise replaces torch's F.linear, for the rest of the process, with an autograd
        # function that keeps the weight (not a view of it) for backward, so that a released weight's gathered
        # storage is freed. The model's linear layers do that themselves (`model.layers.linear`), and blocks
        # are gathered whole again for their backward (`parallel.engine.build_engine`).
        ds_config["zero_optimization"].setdefault("memory_efficient_linear", False)
    return ds_config


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a precision's dtype


def precision(ds_config: dict[str, Any]) -> str:
    """What a DeepSpeed config trains in: 'bf16', 'fp16' or 'fp32'."""
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled"):
            return name
    return "fp32"


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config trains with (0 when it has no `zero_optimization` section)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
