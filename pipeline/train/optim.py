"""The optimizer: AdamW with weight decay on matrices only, the fastest implementation for the device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay 2-D weights (linear layers, embeddings); not biases, norms or other vectors. Under ZeRO-3 a
    parameter's local tensor is a flat partition, so its shape is read from `ds_shape`."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, train: TrainConfig, ds_config: dict[str, Any]) -> tuple[torch.optim.Optimizer, str]:
    """DeepSpeedCPUAdam when ZeRO offloads the optimizer, else torch's fused AdamW (one kernel per step on
    GPU; no extension for DeepSpeed to build at start-up, so no CUDA compiler needed). Returns the optimizer
    and its name for the start-up log."""
    groups = param_groups(model, train.weight_decay)
    kwargs = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "DeepSpeedCPUAdam (optimizer offloaded)"
    return torch.optim.AdamW(groups, fused=True, **kwargs), "torch AdamW (fused)"
