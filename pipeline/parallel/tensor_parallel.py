"""Moving weights between full (TP=1) tensors and tensor-parallel shards.

megatron-core marks every sharded parameter with `tensor_model_parallel=True` and its `partition_dim`;
shards are contiguous chunks in rank order. Everything else is replicated on each TP rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's slice of a full tensor for `param`."""
    if not is_sharded(param):
        return full
    return full.chunk(world_size, dim=param.partition_dim)[rank]


def gather(local: torch.Tensor, param: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The full tensor from every TP rank's slice of `param` (e.g. its weight or its gradient)."""
    world_size = dist.get_world_size(group) if group is not None else 1
    if not is_sharded(param) or world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Copy this TP rank's slices of full (TP=1) tensors into the model's parameters."""
    rank = dist.get_rank(group) if group is not None else 0
    world_size = dist.get_world_size(group) if group is not None else 1
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, param in params.items():
        param.copy_(shard(full[name], param, rank, world_size))


@torch.no_grad()
def full_state_dict(model: nn.Module, group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """The model's parameters as full (TP=1) tensors, on every rank of the TP group."""
    return {name: gather(p.detach(), p, group) for name, p in model.named_parameters()}
