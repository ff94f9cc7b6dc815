"""What each rank is doing: rank 0 logs the long phases as they start and end, and an error that escapes
a phase (a collective timed out, a peer died) is reported as one line naming the rank and the phase."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch.distributed as dist

log = logging.getLogger("freelm.train")
_phases: list[str] = ["start-up"]


class RankFailure(RuntimeError):
    """A phase failed on this rank, typically in a collective; the message names the rank and the phase."""


@contextlib.contextmanager
def phase(name: str, announce: bool = False) -> Iterator[None]:
    """Run the body as phase `name`; with `announce`, rank 0 logs its start and its duration. A failure of
    torch.distributed inside (NCCL's errors, gloo's plain RuntimeError on a timeout or a lost peer) becomes
    a RankFailure naming the rank and the nested phases."""
    loud = announce and dist.get_rank() == 0
    if loud:
        log.info(f"{name} ...")
    start = time.perf_counter()
    _phases.append(name)
    try:
        yield
    except RuntimeError as exc:
        if not (isinstance(exc, dist.DistError) or type(exc) is RuntimeError):  # ours, or already reported
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankFailure(f"rank {dist.get_rank()} of {dist.get_world_size()}: {' > '.join(_phases[1:])} "
                          f"failed after {time.perf_counter() - start:.1f} s: {first}") from exc
    finally:
        _phases.pop()
    if loud:
        log.info(f"{name}: done in {time.perf_counter() - start:.1f} s")
