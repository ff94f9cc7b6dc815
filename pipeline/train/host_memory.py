"""Host memory on CPU runs: what building the trainer frees goes back to the operating system; steps reuse theirs.

glibc serves allocations below its mmap threshold (adaptive, up to 32 MiB) from heaps it rarely shrinks, so
the transient tensors of model construction and checkpoint loading stay resident after they are freed
(measured: 1.6 GB after building the 0.3b model on one of 2 ranks). While the trainer is built, a 1 MiB
threshold maps every larger tensor on its own and unmaps it on free. GPU runs keep glibc's defaults.

Steps run at 4 MiB. At 1 MiB a step maps and faults in its activations anew every time: the transformers loop
at `benchmarks/train_throughput.py`'s CPU shape took 1.83 s a step, against 1.30 s at glibc's defaults and
1.25 s at 4 MiB. Much above 4 MiB, the heaps keep what ZeRO-3's gathered parameters leave behind: peak
resident 6.1 GiB per rank at 32 MiB against 4.2 GiB at 4 MiB (`benchmarks/memory.py`, 0.3b, ZeRO-3, DP 2;
the plan: 4.0).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

import torch

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
CONSTRUCTION_THRESHOLD = 1 << 20
STEADY_THRESHOLD = 4 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def construction_frees_released() -> Iterator[bool]:
    """Within: a 1 MiB mmap threshold. After: 4 MiB, and the heaps trimmed of what the block freed. Yields
    False (and changes nothing) where CUDA is available (models are built on the device) or the C library is
    not glibc."""
    libc = None if torch.cuda.is_available() else _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, CONSTRUCTION_THRESHOLD)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_THRESHOLD)
        libc.malloc_trim(0)
