"""Process-group setup: torch.distributed from the launcher's environment, then megatron-core's grid."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous started right after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> LaunchEnv:
    """Rank layout as set by torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK) or, under a
    bare `srun`, by SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); one process when neither is set."""
    env = os.environ

    def pick(name: str, slurm: str, default: int) -> int:
        return int(env.get(name, env.get(slurm, default)))

    return LaunchEnv(
        rank=pick("RANK", "SLURM_PROCID", 0),
        world_size=pick("WORLD_SIZE", "SLURM_NTASKS", 1),
        local_rank=pick("LOCAL_RANK", "SLURM_LOCALID", 0),
    )


def init_parallel(tensor_parallel: int = 1, timeout_minutes: float = 30.0) -> LaunchEnv:
    """Join the default process group (NCCL on GPU, gloo on CPU) and build megatron-core's TP x DP grid.
    A collective that waits longer than `timeout_minutes` for a rank fails instead of hanging."""
    launch = launch_env()
    # DeepSpeed reads these names whichever launcher (or none) started the process.
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 distributed_timeout_minutes=timeout_minutes)
    if not torch.cuda.is_available():
        _unlink_deepspeed_shm(launch.rank)
    return launch


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce op creates for `rank` when every rank is on one host."""
    env = os.environ
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{rank}"


def _unlink_deepspeed_shm(rank: int) -> None:
    """DeepSpeed's CPU backend maps a ~70 MB /dev/shm buffer per rank and never unlinks it, so every CPU run
    would leave its buffers in RAM after it ends. Start that backend now, wait until every rank has mapped
    every buffer, and unlink this rank's name: the mappings live on until the processes exit, even when killed."""
    import deepspeed.comm

    deepspeed.comm.init_distributed(dist_backend="gloo", verbose=False)
    dist.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
