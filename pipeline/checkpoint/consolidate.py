"""A sharded training checkpoint (ZeRO partitions over data-parallel ranks, megatron-core shards over
tensor-parallel ranks) -> full fp32 weights, as a TP=1 model holds them, read without loading whole files.

Each data-parallel rank's `*_optim_states.pt` holds its partition of the fp32 master weights beside Adam's
two moments. The files are memory-mapped (`torch.load(mmap=True)`), and only the slices of the requested
parameters are copied out, so reading costs the output tensors, not the files. DeepSpeed's layouts:
  - ZeRO-3: rank r's flat groups, taken end to end, hold the r-th chunk of every parameter (chunks of
    ceil(numel / dp) elements, the last one zero-padded), in `param_shapes` order;
  - ZeRO-1/2: each parameter group's flat vector (its parameters in `param_shapes` order, each followed by
    its alignment padding) is cut into dp consecutive partitions, rank r holding the r-th;
  - stage 0 (plain data parallelism): no partitions; every rank's module holds the whole weights, saved
    once per TP rank in `mp_rank_XX_model_states.pt`.
The tensor-parallel shards are then joined along the dimension megatron-core split them on.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.checkpoint.io import MANIFEST, damage, latest_tag
from pipeline.errors import DataError
from pipeline.model.config import ModelConfig
from pipeline.parallel.ds_config import precision, zero_stage

MP_RANK = re.compile(r"mp_rank_(\d+)")
PARTITION_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
BATCH_BYTES = 64 * 2**20  # fp32 bytes `ShardedCheckpoint.parameters` reads per pass over the partition files


def resolve_tag(ckpt_dir: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """`ckpt_dir` as a Path and the checkpoint tag to read (default: `latest`), checked to exist."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise DataError(f"{ckpt_dir}: no checkpoint {tag or '(no latest file)'}")
    if (ckpt_dir / tag / MANIFEST).exists() and (problem := damage(ckpt_dir / tag)):  # none: saved elsewhere
        raise DataError(f"checkpoint {ckpt_dir / tag} is damaged: {problem}")
    return ckpt_dir, tag


def tensor_parallel_degree(ckpt_dir: str | Path, tag: str | None = None) -> int:
    """The TP degree a checkpoint was saved with (from its `mp_rank_XX` file names)."""
    ckpt_dir, tag = resolve_tag(ckpt_dir, tag)
    return 1 + max(int(MP_RANK.search(f.name).group(1)) for f in (ckpt_dir / tag).glob("*mp_rank_*.pt"))


def enum_member(cls: type, name: str) -> enum.Enum:
    """`getattr` as weights-only unpickling may call it: Python 3.11.0-3.11.4 (Debian bookworm's 3.11.2)
    pickle an enum member as `getattr(cls, name)`. Only an allowed enum class's members are returned."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise pickle.UnpicklingError(f"getattr on {cls!r}: only enum members are read from a checkpoint")
    return cls[name]


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, memory-mapped: tensors are read from disk only where they are used.
    Weights-only unpickling, with the few DeepSpeed classes its files hold allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address, (enum_member, "builtins.getattr")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (an incomplete checkpoint?)") from None
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise DataError(f"{path}: not a readable DeepSpeed checkpoint file: {err}") from None


class Segment(NamedTuple):
    """Elements [start, start + numel) of flat tensor `group` in partition file `file`, which go to
    elements [dest, dest + numel) of the flattened parameter."""

    file: int
    group: int
    start: int
    numel: int
    dest: int


def split_range(bounds: list[int], start: int, numel: int) -> Iterator[tuple[int, int, int, int]]:
    """Cut [start, start + numel) of pieces laid end to end (ending at the cumulative `bounds`) into parts:
    (piece, start within the piece, numel, offset of the part within the range)."""
    begin, done = 0, 0
    for piece, end in enumerate(bounds):
        lo, hi = max(start, begin), min(start + numel, end)
        if lo < hi:
            yield piece, lo - begin, hi - lo, done
            done += hi - lo
        begin = end


class ZeroShard:
    """One tensor-parallel rank's fp32 master weights, spread over its data-parallel ranks' ZeRO partition
    files. `shapes` lists the parameters (`named_parameters()` names) in checkpoint order. `states`: the
    rank's model-states file, when the caller has already loaded it."""

    def __init__(self, ckpt_dir: str | Path, tp_rank: int, tag: str | None = None,
                 states: dict[str, Any] | None = None):
        ckpt_dir, tag = resolve_tag(ckpt_dir, tag)
        folder = ckpt_dir / tag
        found = {}
        for path in folder.glob("*_optim_states.pt"):
            match = PARTITION_FILE.search(path.name)
            if match and int(match.group(2)) == tp_rank:
                found[int(match.group(1))] = path
        if not found:
            raise DataError(f"{folder}: no ZeRO partition files (*_optim_states.pt) of TP rank {tp_rank}")
        metas = {rank: load_checkpoint_file(path)["optimizer_state_dict"] for rank, path in sorted(found.items())}
        first = next(iter(metas.values()))
        count = first["partition_count"]
        count = max(count) if isinstance(count, list) else count
        if sorted(found) != list(range(count)):
            missing = sorted(set(range(count)) - set(found))
            raise DataError(f"{folder}: TP rank {tp_rank} was partitioned over {count} data-parallel ranks; the "
                            f"partition files of DP ranks {missing or sorted(found)} are missing or extra")
        self.files = [found[rank] for rank in range(count)]
        self.stage = int(first["zero_stage"])
        self.flat_key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
        flats = [[t.numel() for t in metas[rank][self.flat_key]] for rank in range(count)]
        paddings = first.get("param_alignment_paddings")
        del metas, first

        model_file = folder / (f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt" if self.stage == 3
                               else f"mp_rank_{tp_rank:02d}_model_states.pt")
        if states is None:
            states = load_checkpoint_file(model_file)
        if states.get("frozen_param_shapes"):
            raise DataError(f"{model_file}: frozen parameters are not supported")
        self.ds_config: dict[str, Any] = states.get("ds_config", {})
        groups = [dict(shapes) for shapes in states["param_shapes"]]
        self.shapes: dict[str, torch.Size] = {name: torch.Size(s) for g in groups for name, s in g.items()}
        self.shared: dict[str, str] = dict(states.get("shared_params", {}))  # alias -> parameter (tied weights)
        if self.stage == 3:
            self.layout = self._zero3_layout(flats, folder)
        else:
            self.layout = self._zero12_layout(groups, flats, paddings, folder)

    def _zero3_layout(self, flats: list[list[int]], folder: Path) -> dict[str, list[Segment]]:
        dp, bounds, layout, offset = len(self.files), list(itertools.accumulate(flats[0])), {}, 0
        for name, shape in self.shapes.items():
            numel, segments = shape.numel(), []
            chunk = math.ceil(numel / dp)
            for rank in range(dp):
                mine = max(0, min(chunk, numel - rank * chunk))  # the last chunks end in padding
                segments += [Segment(rank, group, start, size, rank * chunk + done)
                             for group, start, size, done in split_range(bounds, offset, mine)]
            layout[name] = segments
            offset += chunk
        if offset != bounds[-1]:
            raise DataError(f"{folder}: the ZeRO-3 partitions hold {bounds[-1]} elements per rank, the parameters "
                            f"{offset}: a layout this reader does not know")
        return layout

    def _zero12_layout(self, groups: list[dict], flats: list[list[int]], paddings: list[list[int]] | None,
                       folder: Path) -> dict[str, list[Segment]]:
        dp, layout = len(self.files), {}
        for g, shapes in enumerate(groups):
            bounds = list(itertools.accumulate(flats[rank][g] for rank in range(dp)))
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = torch.Size(shape).numel()
                layout[name] = [Segment(rank, g, start, size, dest)
                                for rank, start, size, dest in split_range(bounds, offset, numel)]
                offset += numel + (paddings[g][i] if paddings else 0)
            align = 2 * dp  # DeepSpeed pads each group's end to a multiple of 2 x dp; saved partitions drop it
            if math.ceil(offset / align) != math.ceil(bounds[-1] / align):
                raise DataError(f"{folder}: parameter group {g} holds {bounds[-1]} elements, its parameters "
                                f"{offset}: a layout this reader does not know")
        return layout

    @torch.no_grad()  # the saved flat groups require grad: a copy under autograd would keep their file mapped
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named parameters, fp32, whole across data-parallel ranks (this TP rank's shard of each). Every
        partition file is mapped once per call and unmapped before the next."""
        unknown = [name for name in names if name not in self.shapes]
        if unknown:
            raise DataError(f"{self.files[0].parent}: no parameters {unknown[:3]} in the checkpoint")
        out = {name: torch.empty(self.shapes[name], dtype=torch.float32) for name in names}
        for index, path in enumerate(self.files):
            wanted = [(out[name].view(-1), s) for name in names for s in self.layout[name] if s.file == index]
            if not wanted:
                continue
            flat = load_checkpoint_file(path)["optimizer_state_dict"][self.flat_key]
            for dest, s in wanted:
                dest[s.dest:s.dest + s.numel].copy_(flat[s.group][s.start:s.start + s.numel])
            del flat
        return out


class ModuleShard:
    """One tensor-parallel rank's weights from a ZeRO stage-0 checkpoint: its module's state dict (fp32 runs:
    the weights the optimizer steps; 16-bit runs: the module's 16-bit weights, as fp32). The same interface
    as `ZeroShard`; a tied weight is listed once, its alias in `shared`."""

    def __init__(self, model_file: Path, states: dict[str, Any]):
        self.file = model_file
        self.ds_config: dict[str, Any] = states.get("ds_config", {})
        buffers = set(states.get("buffer_names") or ())
        self.shapes: dict[str, torch.Size] = {}
        self.shared: dict[str, str] = {}
        first: dict[tuple, str] = {}
        for name, tensor in states["module"].items():
            if not isinstance(tensor, torch.Tensor) or name in buffers:
                continue  # megatron-core's `_extra_state` entries, buffers
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if where in first:
                self.shared[name] = first[where]
            else:
                first[where] = name
                self.shapes[name] = tensor.shape

    @torch.no_grad()
    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        unknown = [name for name in names if name not in self.shapes]
        if unknown:
            raise DataError(f"{self.file}: no parameters {unknown[:3]} in the checkpoint")
        module = load_checkpoint_file(self.file)["module"]
        return {name: module[name].to(torch.float32, copy=True) for name in names}


def open_shard(ckpt_dir: str | Path, tp_rank: int, tag: str | None = None) -> ZeroShard | ModuleShard:
    """TP rank `tp_rank`'s weights: a `ModuleShard` when the run used ZeRO stage 0, else a `ZeroShard`."""
    ckpt_dir, tag = resolve_tag(ckpt_dir, tag)
    model_file = ckpt_dir / tag / f"mp_rank_{tp_rank:02d}_model_states.pt"  # ZeRO-3 names its files otherwise
    if not model_file.exists():
        return ZeroShard(ckpt_dir, tp_rank, tag)
    states = load_checkpoint_file(model_file)
    if zero_stage(states.get("ds_config", {})) == 0:
        return ModuleShard(model_file, states)
    return ZeroShard(ckpt_dir, tp_rank, tag, states)


def training_precision(ckpt_dir: str | Path, tag: str | None = None) -> str:
    """'bf16', 'fp16' or 'fp32': what the run trained in, from the DeepSpeed config saved with the checkpoint."""
    return precision(open_shard(ckpt_dir, 0, tag).ds_config)


def tp_shard_state(ckpt_dir: str | Path, tp_rank: int, tag: str | None = None) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s fp32 weights with the ZeRO partitions of every data-parallel rank merged: the
    tensors a model built at the checkpoint's TP degree holds on that rank, by `named_parameters()` name, and
    the tied LM head under its own name too (the same tensor as the embedding)."""
    shard = open_shard(ckpt_dir, tp_rank, tag)
    state = shard.read(list(shard.shapes))
    return state | {alias: state[name] for alias, name in shard.shared.items() if name in state}


def partition_dims(model: ModelConfig) -> dict[str, int | None]:
    """Each parameter's tensor-parallel partition dimension (None: replicated), in `named_parameters()` order."""
    from pipeline.model.freelm import FreeLM

    with torch.device("meta"):
        reference = FreeLM(dataclasses.replace(model, vocab_pad_multiple=0))
    return {name: p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            for name, p in reference.named_parameters()}


class ShardedCheckpoint:
    """A training checkpoint (`tag`, default `latest`) read back as full (TP=1) fp32 parameters: `shapes` lists
    them in `named_parameters()` order (the tied LM head is the embedding; the vocab keeps its TP padding).
    `precision`: what the run trained in (bf16, fp16 or fp32), from the DeepSpeed config saved with it."""

    def __init__(self, ckpt_dir: str | Path, model: ModelConfig, tag: str | None = None):
        ckpt_dir, tag = resolve_tag(ckpt_dir, tag)
        self.path = ckpt_dir / tag
        self.shards = [open_shard(ckpt_dir, rank, tag) for rank in range(tensor_parallel_degree(ckpt_dir, tag))]
        self.ds_config = self.shards[0].ds_config
        self.precision = precision(self.ds_config)
        dims = partition_dims(model)
        missing = [name for name in dims if name not in self.shards[0].shapes]
        if missing:
            raise DataError(f"{self.path}: no parameters {missing[:3]} in the checkpoint (a {model.block} block "
                            "model is expected)")
        self.dims = {name: dim if len(self.shards) > 1 else None for name, dim in dims.items()}
        self.shapes: dict[str, torch.Size] = {}
        for name, dim in self.dims.items():
            shape = list(self.shards[0].shapes[name])
            if dim is not None:
                shape[dim] *= len(self.shards)
            self.shapes[name] = torch.Size(shape)

    def parameters(self, batch_bytes: int = BATCH_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor) in `shapes` order; about `batch_bytes` of them are read per pass over the
        partition files and held until taken."""
        nbytes = {name: 4 * shape.numel() for name, shape in self.shapes.items()}
        for batch in batches(list(self.shapes), nbytes, batch_bytes):
            parts = [shard.read(batch if rank == 0 else [n for n in batch if self.dims[n] is not None])
                     for rank, shard in enumerate(self.shards)]
            for name in batch:
                pieces = [part.pop(name) for part in parts if name in part]
                yield name, torch.cat(pieces, dim=self.dims[name]) if len(pieces) > 1 else pieces[0]


def batches(names: list[str], nbytes: dict[str, int], limit: int) -> Iterator[list[str]]:
    """`names` in order, cut into runs of about `limit` bytes (a larger tensor is a run of its own)."""
    batch, size = [], 0
    for name in names:
        batch.append(name)
        size += nbytes[name]
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def consolidate(ckpt_dir: str | Path, model: ModelConfig, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of checkpoint `tag` (default: `latest`) under `ckpt_dir`, one entry per parameter as
    `named_parameters()` lists them (the tied LM head is the embedding); the vocab keeps its trained padding."""
    return dict(ShardedCheckpoint(ckpt_dir, model, tag).parameters())
