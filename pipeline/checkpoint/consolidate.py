"""A sharded training checkpoint (ZeRO partitions over data-parallel ranks, megatron-core shards over
tensor-parallel ranks) -> one full fp32 state dict, as a TP=1 model holds it.

DeepSpeed's `zero_to_fp32` merges the ZeRO partitions of one model-parallel rank but refuses TP > 1. So each
TP rank's files are shown to it on their own (through links that rename them to rank 0), and the merged TP
shards are then joined along the dimension megatron-core split them on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import tempfile
from pathlib import Path

import torch

from pipeline.model.config import ModelConfig
from pipeline.checkpoint.io import latest_tag

MP_RANK = re.compile(r"mp_rank_(\d+)")


def resolve_tag(ckpt_dir: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """`ckpt_dir` as a Path and the checkpoint tag to read (default: `latest`), checked to exist."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint {tag or '(no latest file)'}")
    return ckpt_dir, tag


def tensor_parallel_degree(ckpt_dir: str | Path, tag: str | None = None) -> int:
    """The TP degree a checkpoint was saved with (from its `mp_rank_XX` file names)."""
    ckpt_dir, tag = resolve_tag(ckpt_dir, tag)
    return 1 + max(int(MP_RANK.search(f.name).group(1)) for f in (ckpt_dir / tag).glob("*mp_rank_*.pt"))


def tp_shard_state(ckpt_dir: str | Path, tp_rank: int, tag: str | None = None) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s fp32 weights with the ZeRO partitions of every data-parallel rank merged: the
    tensors a model built at the checkpoint's TP degree holds on that rank, by `named_parameters()` name."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = resolve_tag(ckpt_dir, tag)
    files = [f for f in sorted((ckpt_dir / tag).glob("*mp_rank_*.pt")) if int(MP_RANK.search(f.name).group(1)) == tp_rank]
    with tempfile.TemporaryDirectory() as view:
        (Path(view) / tag).mkdir()
        for f in files:
            (Path(view) / tag / MP_RANK.sub("mp_rank_00", f.name)).symlink_to(f.resolve())
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its prints
            return get_fp32_state_dict_from_zero_checkpoint(view, tag=tag)


def consolidate(ckpt_dir: str | Path, model: ModelConfig, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of checkpoint `tag` (default: `latest`) under `ckpt_dir`, one entry per parameter as
    `named_parameters()` lists them (the tied LM head is the embedding); the vocab keeps its trained padding."""
    tp = tensor_parallel_degree(ckpt_dir, tag)
    return join_tp_shards([tp_shard_state(ckpt_dir, rank, tag) for rank in range(tp)], model)


def join_tp_shards(shards: list[dict[str, torch.Tensor]], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Concatenate each sharded tensor along its partition dim; replicated tensors are taken from rank 0."""
    from pipeline.model.freelm import FreeLM

    with torch.device("meta"):
        reference = FreeLM(dataclasses.replace(model, vocab_pad_multiple=0))
    full = {}
    for name, param in reference.named_parameters():
        if getattr(param, "tensor_model_parallel", False) and len(shards) > 1:
            full[name] = torch.cat([shard[name] for shard in shards], dim=param.partition_dim)
        else:
            full[name] = shards[0][name]
    return full
