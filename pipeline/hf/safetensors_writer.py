"""Write a Hugging Face weights directory one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. Here the names and shapes are
planned first and cut into files of at most `max_shard_bytes`, so each file's header is written before its
data and every tensor is written as it is produced, then dropped. The files are plain safetensors (8-byte
little-endian header length, JSON header of dtype, shape and data offsets, raw little-endian data); several
files get `model.safetensors.index.json`, as transformers writes them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsWriter:
    """Writes the tensors of `plan` (name -> shape, in the order they will come) in `dtype` under `out`.
    Use as a context manager; `write` each planned tensor in order."""

    def __init__(self, out: Path, plan: dict[str, torch.Size], dtype: torch.dtype, max_shard_bytes: int):
        self.out, self.dtype, self.plan = Path(out), dtype, plan
        self.files: list[list[str]] = [[]]
        size = 0
        for name, shape in plan.items():
            nbytes = shape.numel() * dtype.itemsize
            if self.files[-1] and size + nbytes > max_shard_bytes:
                self.files.append([])
                size = 0
            self.files[-1].append(name)
            size += nbytes
        count = len(self.files)
        self.names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                        for i in range(1, count + 1)]
        self.order = list(plan)
        self.file_of = {name: file for file, names in enumerate(self.files) for name in names}
        self.written = 0
        self.handle: BinaryIO | None = None

    def __enter__(self) -> SafetensorsWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out.glob("model*.safetensors"), *self.out.glob(INDEX_FILE)]:  # a previous export's
            stale.unlink()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()
        if exc[0] is None:
            if self.written != len(self.order):
                raise RuntimeError(f"{self.out}: {len(self.order) - self.written} planned tensors were not written")
            if len(self.names) > 1:
                self._write_index()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.written] if self.written < len(self.order) else None
        if name != expected or tensor.shape != self.plan.get(name):
            raise ValueError(f"{self.out}: got {name!r} {tuple(tensor.shape)}, the plan expects {expected!r} next")
        file = self.file_of[name]
        if self.files[file][0] == name:
            self._open(file)
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous().reshape(-1)
        self.handle.write(data.view(torch.uint8).numpy().data)
        self.written += 1

    def _open(self, file: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in self.files[file]:
            end = offset + self.plan[name].numel() * self.dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[self.dtype], "shape": list(self.plan[name]),
                            "data_offsets": [offset, end]}
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self.handle = open(self.out / self.names[file], "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def _write_index(self) -> None:
        total = sum(shape.numel() for shape in self.plan.values()) * self.dtype.itemsize
        weight_map = {name: self.names[file] for name, file in self.file_of.items()}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
