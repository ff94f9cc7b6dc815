"""Checkpoints: DeepSpeed's sharded save with the trainer's state as client state.

A checkpoint is `run_dir/checkpoints/step_XXXXXXXX/`. The `latest` file beside them (the name DeepSpeed's
tools read) is written only after every rank has finished its shards, atomically, so a crash during a save
leaves the previous checkpoint as the one a restart resumes from.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """This process's RNG states in types `torch.load(weights_only=True)` reads: tensors, numbers, tuples."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    return path.read_text().strip() if path.exists() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / LATEST)
    dist.barrier()
    return ckpt_dir / tag


def prune(ckpt_dir: Path, keep: int, keep_every: int = 0) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (0: keep all), sparing those whose step is a
    multiple of `keep_every`; call it after `latest` names the newest. Returns the removed tags."""
    latest = latest_tag(ckpt_dir)
    if keep < 1 or latest is None:
        return []
    tags = sorted(p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= latest)
    removed = [tag for tag in tags[:-keep] if not (keep_every and int(tag.split("_")[1]) % keep_every == 0)]
    for tag in removed:
        shutil.rmtree(ckpt_dir / tag)
    return removed


def load_latest(engine, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restore engine, optimizer, LR schedule and this rank's RNG from the latest complete checkpoint;
    returns the trainer's client state, or None when there is no checkpoint yet."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state
