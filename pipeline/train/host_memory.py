"""Host memory on CPU runs: what building the trainer frees goes back to the operating system; steps reuse theirs.

glibc serves allocations below its mmap threshold (adaptive, up to 32 MiB) from heaps it rarely shrinks, so
the transient tensors of model construction and checkpoint loading stay resident after they are freed
(measured: 1.6 GB after building the 0.3b model on one of 2 ranks). While the trainer is built, a 1 MiB
threshold maps every larger tensor on its own and unmaps it on free. GPU runs keep glibc's defaults.

Steps then run at a threshold just above the run's largest activation (the MLP's intermediate tensor of the
largest micro-batch), between 4 MiB and glibc's 32 MiB ceiling: a step's activations come from the heap, where
the previous step freed them, instead of being mapped and faulted in anew each time. At 1 MiB the
transformers loop at `benchmarks/train_throughput.py`'s CPU shape took 1.83 s a step, against 1.30 s at
glibc's defaults and 1.25 s at 4 MiB; a bare loop of our model there (12 MiB intermediates) took 20,000 page
faults a step at 32 MiB against 25,000-87,000 at 4 MiB. Nor do steps give the heap's free top back (glibc
trims it past 128 KiB once a threshold is set): with the trim threshold at its 2 GiB maximum, a ZeRO-1 step
there took 16,500 page faults against 45,000 (the 0.3b figures below are the same either way). Larger tensors
stay mapped on their own, because heaps keep what ZeRO-3's gathered parameters and full-size gradients leave
behind: at the 0.3b preset, seq 64, ZeRO-3, DP 2 (`benchmarks/memory.py`, whose largest activation is 1 MiB),
the peak resident set is 4.29 GiB per rank at 4 MiB, 4.57-4.60 at 16 MiB and 5.11-5.16 at 32 MiB (the plan:
4.04); with no mapping at all in steps, 6.9-7.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers in glibc's malloc.h
CONSTRUCTION_THRESHOLD = 1 << 20
STEADY_FLOOR, STEADY_CEILING = 4 << 20, 32 << 20
STEADY_TRIM = (1 << 31) - 1  # the largest value mallopt takes (an int)


def steady_threshold(largest_activation: int) -> int:
    """The smallest power of two above `largest_activation` bytes, within 4 MiB .. 32 MiB."""
    return min(STEADY_CEILING, max(STEADY_FLOOR, 1 << largest_activation.bit_length()))


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def construction_frees_released(largest_activation: int) -> Iterator[bool]:
    """Within: a 1 MiB mmap threshold. After: `steady_threshold(largest_activation)`, the heaps trimmed of
    what the block freed, then trimmed only past `STEADY_TRIM`. Yields False (and changes nothing) where CUDA is
    available (models are built on the device) or the C library is not glibc."""
    libc = None if torch.cuda.is_available() else _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, CONSTRUCTION_THRESHOLD)
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, steady_threshold(largest_activation))
        libc.malloc_trim(0)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM)
