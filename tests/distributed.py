"""Run a function on N real processes joined by gloo, the way torchrun would start them."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from pipeline.parallel.distributed import free_port


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, env: dict, cwd: str, args: tuple) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    fn(*args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call `fn(*args)` on `world_size` fresh ranks; a failure on any rank fails the caller with its traceback.
    `fn` must be a module-level function; ranks report results by writing files.

    On CPU the ranks fork from one forkserver that imported the trainer (torch, DeepSpeed, megatron-core: ~10 s a
    process on 2 cores) once per session; they get the caller's environment and directory at the call. On CUDA
    they are spawned: a server that imported DeepSpeed may have initialised the driver, which a fork cannot use."""
    env, cwd = dict(os.environ), os.getcwd()
    if torch.cuda.is_available():
        method = "spawn"
    else:
        method = "forkserver"
        multiprocessing.set_forkserver_preload(["pipeline.train.trainer"])
    mp.start_processes(_entry, args=(fn, world_size, free_port(), env, cwd, args), nprocs=world_size,
                       start_method=method)


def start_cli_ranks(args: list[str], world_size: int, cwd: Path, **popen: Any) -> list[subprocess.Popen]:
    """`python -m pipeline.cli ARGS` on `world_size` processes started as srun starts a job step's tasks: one
    process each, ranks from the environment, all in one process group (the first rank's)."""
    port, procs = str(free_port()), []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, text=True,
                                      process_group=procs[0].pid if procs else 0, **popen))
    return procs
