"""DeepSpeed ZeRO over megatron-core's tensor-parallel grid.

ZeRO partitions parameters, gradients and optimizer state over the data-parallel group while each
tensor-parallel rank keeps its own shards. Two details make that composition correct:
  - DeepSpeed asks its `mpu` for `get_model_parallel_*` and `get_data_parallel_*`; `MegatronMPU` answers
    from megatron-core's `parallel_state`;
  - `deepspeed.zero.Init` must be given the data-parallel group: with the default (WORLD) it broadcasts
    every parameter from global rank 0 and overwrites TP rank 1's shards with rank 0's, silently.
"""

from __future__ import annotations

from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules
from megatron.core import parallel_state as ps
from torch import nn

from pipeline.parallel.ds_config import zero_stage


class MegatronMPU:
    """The model-parallel-unit interface DeepSpeed calls, backed by megatron-core's parallel_state."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)


def build_model(make: Callable[[], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """Construct the model; under ZeRO-3 inside `zero.Init`, so no rank ever holds the whole of it."""
    if zero_stage(ds_config) != 3:
        return make()
    with deepspeed.zero.Init(data_parallel_group=ps.get_data_parallel_group(), config_dict_or_path=ds_config):
        return make()


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any], lr_scheduler=None):
    """The DeepSpeed engine. Under ZeRO-3 each decoder block (`model.blocks`) is one unit of gathering, as
    torchtitan shards each block with FSDP: DeepSpeed's leaf modules get one gather, one release and one
    hook pair per block and pass, not one per linear layer and norm (what `freelm plan` counts as the running
    block's gathered parameters either way; a compiled block then runs as one graph).

    With one data-parallel rank there is nothing to scatter: `reduce_scatter` defaults to false there, so
    DeepSpeed reduces its contiguous gradient bucket in place instead of first concatenating every gradient
    into a second buffer (ZeRO-3: 0.96x `benchmarks/train_throughput.py`'s CPU baseline with it, 1.01x
    without, medians of 8 paired runs each). Across ranks it stays: the all-reduce that replaces it would move
    twice the bytes."""
    if zero_stage(ds_config) == 3:
        set_z3_leaf_modules(model, list({type(block) for block in model.blocks}))
    if zero_stage(ds_config) and ps.get_data_parallel_world_size() == 1:
        ds_config = {**ds_config, "zero_optimization": {"reduce_scatter": False, **ds_config["zero_optimization"]}}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, mpu=MegatronMPU(), lr_scheduler=lr_scheduler
    )
    return engine


@torch.no_grad()
def grad_norm(module: nn.Module) -> torch.Tensor:
    """The L2 norm of the whole model's gradients, from each TP rank's shards: TP-sharded parameters count on every
    TP rank, replicated ones on TP rank 0 only. What DeepSpeed's ZeRO optimizers report; at stage 0 its
    engine clips with the norm and drops it."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    grads = [p.grad for p in module.parameters()
             if p.grad is not None and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    total = torch.nn.utils.get_total_norm(grads).float().square() if grads else torch.zeros(())
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_tensor_model_parallel_group())
    return total.sqrt()


def compile_blocks(blocks: nn.ModuleList) -> None:
    """Regional compilation: each decoder block's `forward` compiled in place (parameter names and checkpoints
    unchanged). One block's code serves them all: blocks share a compiled graph, with the parameters as its
    inputs. Only `forward` is compiled, not the block's whole call (`Module.compile`): the hooks
    `Module.__call__` runs around it, DeepSpeed's ZeRO-3 gather and release among them, stay eager. Compiling
    the call made dynamo trace those hooks and recompile them once per block (they read each block's `ds_id`):
    ZeRO-3 with compiled blocks ran at 0.73x `benchmarks/train_throughput.py`'s CPU baseline, now 0.98-1.02x.
    DeepSpeed's own `engine.compile` compiles the whole model at once; per block, compile time stays that of
    one block whatever the depth."""
    for block in blocks:
        block.forward = torch.compile(block.forward)
