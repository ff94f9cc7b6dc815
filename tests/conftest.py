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


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real single-node SLURM (slurmctld, slurmd, munged) for the session, stopped by PID at the end.
    Where it cannot start, tests skip with the reason, except in CI (CI=true), which must run them."""
    from slurm_cluster import SlurmUnavailable, local_slurm

    try:
        with local_slurm(tmp_path_factory.mktemp("slurm")) as running:
            yield running
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE (50,257 ids) imported with `freelm tokenizer import` (50,260 ids)."""
    from realsize import freelm, save_gpt2_tokenizer

    root = tmp_path_factory.mktemp("gpt2-tokenizer")
    save_gpt2_tokenizer(root / "hf")
    freelm("tokenizer", "import", "--hf", str(root / "hf"), "--out", str(root / "tok"))
    return root / "tok"
