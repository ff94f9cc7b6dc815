"""Shared fixtures: a one-process parallel state for model tests, and the path to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distributed import free_port

SHARED_DATA = (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def parallel_1():
    """torch.distributed (gloo, world size 1) and megatron-core's parallel state with TP=1, for the session."""
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(tensor_parallel=1)
    yield
    destroy_parallel()
