"""Shared fixtures: a one-process parallel state for model tests, the SLURM clusters, and the data of the
training tests (prepared once per session from ../shared/data)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (Path(__file__).resolve().parents[2] / "shared" / "data").resolve()
BOOKS = SHARED_DATA / "lm" / "gutenberg_nltk"
# The profiler's op per SDPA kernel, by the names `pipeline.model.layers.attention_kernel` reports (on CPU the
# op's name carries a `_for_cpu` suffix: match by prefix).
SDPA_OPS = {"flash": "aten::_scaled_dot_product_flash_attention",
            "memory-efficient": "aten::_scaled_dot_product_efficient_attention",
            "cuDNN": "aten::_scaled_dot_product_cudnn_attention",
            "math": "aten::_scaled_dot_product_attention_math"}


@pytest.fixture(scope="session")
def parallel_1():
    """torch.distributed (gloo, world size 1) and megatron-core's parallel state with TP=1, for the session."""
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(tensor_parallel=1)
    yield
    destroy_parallel()


def started(cluster: Iterator[Any]) -> Iterator[Any]:
    """Yield the running cluster of a context manager; where it cannot start, skip with the reason, except in
    CI (CI=true), which must run what needs it."""
    from slurm_cluster import SlurmUnavailable

    try:
        with cluster as running:
            yield running
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real single-node SLURM (slurmctld, slurmd, munged) for the session, stopped by PID at the end."""
    from slurm_cluster import local_slurm

    yield from started(local_slurm(tmp_path_factory.mktemp("slurm")))


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE (50,257 ids) imported with `freelm tokenizer import` (50,260 ids)."""
    from realsize import freelm, save_gpt2_tokenizer

    root = tmp_path_factory.mktemp("gpt2-tokenizer")
    save_gpt2_tokenizer(root / "hf")
    freelm("tokenizer", "import", "--hf", str(root / "hf"), "--out", str(root / "tok"))
    return root / "tok"


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory):
    """A real two-node SLURM (node1, node2: network namespaces with a slurmd and an sshd each; slurmctld and
    munged on the host) for the session, torn down at the end. It runs beside `cluster` without sharing
    ports, munge sockets or SLURM_CONF."""
    from two_node_cluster import two_node_slurm

    yield from started(two_node_slurm(tmp_path_factory.mktemp("two-nodes")))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """Tokenizer, a Gutenberg corpus and TREC + CoLA train propositions, prepared by the CLI. (TREC's six
    candidates per question give the teacher a base rate a tiny model learns within a short run.)"""
    root = tmp_path_factory.mktemp("data")
    books = [str(BOOKS / name) for name in ("austen-persuasion.txt", "chesterton-brown.txt")]

    def freelm(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True, capture_output=True, cwd=REPO)

    freelm("tokenizer", "train", "--input", *books, "--vocab-size", "1000", "--out", str(root / "tok"))
    freelm("data", "corpus", "--input", *books, "--tokenizer", str(root / "tok"), "--out", str(root / "lm"))
    freelm("data", "tasks", "--config", str(REPO / "recipes" / "tasks.yaml"), "--split", "train", "--only", "trec,cola",
           "--tokenizer", str(root / "tok"), "--out", str(root / "teacher"), "--max-len", "64")
    return root
