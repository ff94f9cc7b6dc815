"""Run a function on N real processes joined by gloo, the way torchrun would start them."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch.multiprocessing as mp

from pipeline.parallel.distributed import free_port


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    import torch

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    fn(*args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call `fn(*args)` on `world_size` spawned ranks; a failure on any rank fails the caller with its traceback.
    `fn` must be a module-level function; ranks report results by writing files."""
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="spawn")
