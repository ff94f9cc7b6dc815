"""Checkpoints: DeepSpeed's sharded save with the trainer's state as client state.

A checkpoint is `run_dir/checkpoints/step_XXXXXXXX/`. Once every rank has written its shards, rank 0 lists
every file with its size in `manifest.json`, then names the tag in `latest` (the name DeepSpeed's tools
read), each written atomically. So a crash or a full disk during a save leaves the previous checkpoint as the
latest, and a checkpoint damaged later (a truncated or missing shard) is caught at load, before DeepSpeed
reads it, and the run resumes from the newest complete one before it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import CheckpointError

LATEST = "latest"
MANIFEST = "manifest.json"
log = logging.getLogger("freelm.checkpoint")


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (one all-reduce, on the default group's device)."""
    value = torch.tensor([float(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _why(exc: BaseException, path: Path) -> str:
    """One line for a failed write, with the room left where it was written (torch's own message on a full
    disk is often only "unexpected pos ...")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    if getattr(exc, "errno", None) == errno.ENOSPC or free < 64 * 2**20:
        return f"no space left on device ({free / 2**20:.1f} MiB free there): {text}"
    return f"{text} ({free / 1e9:.1f} GB free there)"


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Save on every rank; `latest` moves to this checkpoint only if every rank wrote all of its files.
    A failure on any rank (a full disk, a permission error) raises CheckpointError on every rank, naming
    the path, and removes the partial checkpoint."""
    tag = f"step_{step:08d}"
    path = ckpt_dir / tag
    start, error, files = time.perf_counter(), None, {}
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as exc:  # noqa: BLE001  (any failure: the ranks must agree before anyone raises)
        error = exc
        dist.barrier()  # the barrier that ends DeepSpeed's save, which the other ranks are waiting in
    if error is None:
        try:
            torch.save(rng_state(), path / f"rng_rank{dist.get_rank():05d}.pt")
        except Exception as exc:  # noqa: BLE001
            error = exc
    if not any_rank(error is not None) and dist.get_rank() == 0:  # every rank's files are there
        try:
            files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
                     if f.is_file() and f.name != MANIFEST}
            _write_atomic(path / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
            _write_atomic(ckpt_dir / LATEST, tag)
        except Exception as exc:  # noqa: BLE001
            error = exc
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, None if error is None else _why(error, path))
    if failed := [(rank, why) for rank, why in enumerate(reasons) if why is not None]:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        rank, why = failed[0]
        others = f" and {len(failed) - 1} other rank(s)" if len(failed) > 1 else ""
        raise CheckpointError(f"{path}: saving step {step} failed on rank {rank}{others}: {why}. The latest "
                              f"checkpoint is still {latest_tag(ckpt_dir) or 'none'}; nothing older was touched")
    if dist.get_rank() == 0:
        size = sum(files.values())
        elapsed = time.perf_counter() - start
        log.info(f"checkpoint: {path} ({size / 1e9:.2f} GB in {elapsed:.1f} s, {size / 1e9 / elapsed:.2f} GB/s)")
    return path


def damage(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded (a missing manifest, a missing or truncated file), or None."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing (the save did not finish)"
    except (ValueError, KeyError) as exc:
        return f"{path / MANIFEST} is unreadable ({exc})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if (actual := file.stat().st_size) != size:
            return f"{file} is {actual:,} bytes, the manifest says {size:,} (truncated or overwritten)"
    return None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoints a run may resume from, newest first: `latest` and every older one."""
    latest = latest_tag(ckpt_dir)
    if latest is None:
        return []
    return sorted((p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name <= latest), reverse=True)


def prune(ckpt_dir: Path, keep: int, keep_every: int = 0) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (0: keep all), sparing those whose step is a
    multiple of `keep_every`; call it after `latest` names the newest. Returns the removed tags."""
    tags = complete_tags(ckpt_dir)
    if keep < 1:
        return []
    removed = [tag for tag in tags[keep:] if not (keep_every and int(tag.split("_")[1]) % keep_every == 0)]
    for tag in removed:
        shutil.rmtree(ckpt_dir / tag)
    return removed


def _set_aside(ckpt_dir: Path, tags: list[str]) -> list[str]:
    """Rename damaged checkpoints out of the `step_*` namespace, so that no tool mistakes them for good ones."""
    names = []
    for tag in tags:
        target = ckpt_dir / f"damaged_{tag}_{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(ckpt_dir / tag, target)
        names.append(target.name)
    return names


def load_latest(engine, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restore engine, optimizer, LR schedule and this rank's RNG from the newest undamaged checkpoint;
    returns the trainer's client state, or None when there is no checkpoint yet. Every rank checks every
    file, and the ranks agree, so all of them load the same one."""
    tags = complete_tags(ckpt_dir)
    for tag in tags:
        problem = damage(ckpt_dir / tag)
        if any_rank(problem is not None):
            if dist.get_rank() == 0:
                log.warning(f"checkpoint {tag} is damaged: {problem or 'another rank found a bad file'}; "
                            f"trying the one before it")
            continue
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        set_rng_state(torch.load(ckpt_dir / tag / f"rng_rank{dist.get_rank():05d}.pt", weights_only=True))
        if tag != tags[0] and dist.get_rank() == 0:
            set_aside = _set_aside(ckpt_dir, tags[: tags.index(tag)])
            _write_atomic(ckpt_dir / LATEST, tag)
            log.warning(f"resuming from {tag}, the newest complete checkpoint; the damaged ones are kept as "
                        f"{', '.join(set_aside)} (delete them when done)")
        return client_state
    if tags:
        raise CheckpointError(f"{ckpt_dir}: every checkpoint ({', '.join(tags)}) is damaged; move them away to "
                              f"start afresh")
    return None
