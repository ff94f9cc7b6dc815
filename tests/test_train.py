"""The trainer, end to end on real data: DeepSpeed ZeRO-3 over DP, TP and a TP x DP grid of gloo processes,
the two-signal schedule, exact resume, non-finite steps."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from distributed import free_port, run_ranks
from mlflow_server import MlflowServer



def overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    base = {
        "model.preset": "tiny", "model.vocab_size": 1000, "data.tokenizer": data / "tok",
        "data.corpora": f"[{data / 'lm'}]", "data.teacher": data / "teacher" / "train", "data.seq_len": 64,
        "data.num_workers": 0, "train.run_dir": run_dir, "train.ds_config": REPO / "ds_configs" / "zero3.json",
        "train.lr": 3e-3, "train.min_lr": 3e-4, "train.warmup_steps": 4, "train.micro_batch": 8,
        "train.teacher_micro_batch": 16, "train.save_every": 1000, "train.seed": 7,
    }
    base.update(extra)
    return [f"{key}={value}" for key, value in base.items()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def series(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def train_rank(args: list[str]) -> None:
    from pipeline.config import load_config
    from pipeline.train.trainer import train

    train(load_config(None, args))


def launch(tool: str, nprocs: int, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Start `freelm train` the way users do: the deepspeed launcher or torchrun."""
    port = str(free_port())
    launcher = {
        "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
                      "--master_port", port, "--module", "pipeline.cli"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                     "--master_port", port, "-m", "pipeline.cli"],
    }[tool]
    out = subprocess.run([*launcher, "train", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shared memory left behind"
    return out


def test_schedule_patterns():
    from pipeline.config import TrainConfig
    from pipeline.train.schedule import Schedule, learning_rate

    one = Schedule("interactive", 1, 1)
    assert [one.signals(s) for s in range(4)] == [("language",), ("teacher",)] * 2
    three = Schedule("interactive", 3, 1)
    assert [three.signals(s)[0][0] for s in range(8)] == list("llltlllt")
    assert [three.count("language", n) for n in (1, 3, 4, 7, 8)] == [1, 3, 3, 6, 6]
    assert [three.count("teacher", n) for n in (3, 4, 8)] == [0, 1, 2]
    assert Schedule("mixed").signals(5) == ("language", "teacher") and Schedule("mixed").count("teacher", 9) == 9
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, cfg) == 0.1 and learning_rate(9, cfg) == 1.0
    assert learning_rate(10, cfg) == 1.0 and abs(learning_rate(100, cfg) - 0.1) < 1e-9


def test_mfu_peaks_by_device_name():
    from pipeline.train.throughput import gpu_peak

    names = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA A10G",
             "NVIDIA A10", "NVIDIA A100-SXM4-80GB"]
    assert [gpu_peak(name) for name in names] == [989e12, 756e12, 835e12, 989e12, None, 125e12, 312e12]


MAPPED_PROBE = """
import ctypes, ctypes.util, json, torch
from pipeline.train.host_memory import construction_frees_released

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2

def mapped(nbytes):
    before = libc.mallinfo2().hblkhd  # bytes in mmapped chunks, all arenas
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    grown = libc.mallinfo2().hblkhd - before
    del buffer
    return grown

def kept(nbytes):
    # Nothing may be allocated while the tensor lives: above it, that would pin the heap's top, and glibc
    # trims only the top (so `mapped`'s reading in between would hide a trim).
    before = libc.mallinfo2().arena  # bytes the heaps hold from the system
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    del buffer
    return libc.mallinfo2().arena - before

with construction_frees_released(12 << 20) as applied:
    inside = mapped(2 << 20)
print(json.dumps([applied, inside, kept(12 << 20), mapped(2 << 20), mapped(12 << 20), mapped(16 << 20)]))
"""


def test_construction_maps_large_buffers_and_steps_keep_their_activations_in_the_heap():
    """While the trainer is built a 2 MiB tensor gets a mapping of its own (unmapped on free). Afterwards, for
    a run whose largest activation is 12 MiB, the heap serves tensors of up to that size and keeps them when
    freed (a step's freed activations serve the next step), and a 16 MiB one is mapped again. In a fresh
    process: glibc maps a request only when its heap has no free chunk that fits."""
    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("the C library is not glibc >= 2.33")
    out = subprocess.run([sys.executable, "-c", MAPPED_PROBE], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    applied, inside, kept, after, activation, larger = json.loads(out.stdout.splitlines()[-1])
    assert applied and inside >= 2 << 20 and kept >= 12 << 20 and after == activation == 0 and larger >= 16 << 20


def test_steady_threshold_sits_above_the_largest_activation_within_glibc_bounds():
    from pipeline.train.host_memory import steady_threshold

    mib = 1 << 20
    assert [steady_threshold(n) // mib for n in (0, 3 * mib, 4 * mib, 12 * mib, 16 * mib - 1, 100 * mib)] == \
        [4, 4, 8, 16, 16, 32]


def test_zero3_dp2_trains_both_signals_with_the_deepspeed_launcher(data, tmp_path):
    run = tmp_path / "run"
    out = launch("deepspeed", 2, overrides(data, run, **{"train.steps": 60}))
    assert "grid: world 2 = TP 1 x DP 2; ZeRO stage 3" in out.stderr + out.stdout
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 61))
    language, teacher = series(rows, "loss/language"), series(rows, "loss/teacher")
    assert len(language) == len(teacher) == 30  # interactive 1:1
    assert sum(language[-5:]) < sum(language[:5]) * 0.9
    assert sum(teacher[-8:]) < sum(teacher[:8]) * 0.9
    assert all(key in rows[-1] for key in ("train/lr", "train/grad_norm", "throughput/teacher_tokens_per_s",
                                             "throughput/mfu_percent"))
    assert "throughput/language_tokens_per_s" in rows[-2] and "throughput/language_tokens_per_s" not in rows[-1]
    assert max(row["throughput/mfu_percent"] for row in rows) < 100  # the CPU peak is not understated
    assert (run / "checkpoints" / "latest").read_text() == "step_00000060"
    from mlflow.tracking import MlflowClient

    saved = json.loads((run / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    assert len(client.get_metric_history(saved["run_id"], "loss/language")) == 30
    assert len(client.get_metric_history(saved["run_id"], "loss/teacher")) == 30
    assert_run_describes_itself(client, saved["run_id"], run, {"world_size": "2", "tensor_parallel": "1",
                                                                "data_parallel": "2", "zero_stage": "3"})


def assert_run_describes_itself(client, run_id: str, run_dir: Path, grid: dict[str, str]) -> None:
    """Run name, tags (code, command, grid), artifacts (the files themselves) and the experiment's kind and
    artifact location, as a finished training job leaves them."""
    found = client.get_run(run_id)
    tags = found.data.tags
    assert found.info.run_name == run_dir.name
    assert {key: tags[f"freelm.{key}"] for key in grid} == grid
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert tags["mlflow.source.git.commit"] == head.strip() and " train " in f"{tags['freelm.command']} "
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "ds_config.json", "metrics.jsonl"]
    for name in ("config.yaml", "metrics.jsonl"):
        assert Path(client.download_artifacts(run_id, name, str(run_dir / "downloaded"))).read_bytes() == (
            run_dir / name).read_bytes()
    experiment = client.get_experiment(found.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (run_dir / "mlartifacts").resolve().as_uri()


def losses(run_dir: Path) -> list[float]:
    return [row.get("loss/language", row.get("loss/teacher")) for row in metrics(run_dir)]


def test_tp2_and_tp2_x_dp2_match_tp1(data, tmp_path):
    """Same global batch (8 sequences / 16 propositions) on 1, 2 (TP) and 4 (TP x DP) processes; schedule 2:1."""
    steps = {"train.steps": 6, "train.language_steps": 2, "tracking.enabled": "true"}
    run_ranks(train_rank, 1, overrides(data, tmp_path / "tp1", **steps))
    launch("torchrun", 2, overrides(data, tmp_path / "tp2", **steps, **{"parallel.tensor_parallel": 2}))
    run_ranks(train_rank, 4, overrides(data, tmp_path / "grid", **steps, **{
        "parallel.tensor_parallel": 2, "train.micro_batch": 4, "train.teacher_micro_batch": 8}))
    reference = losses(tmp_path / "tp1")
    assert [("loss/teacher" in r) for r in metrics(tmp_path / "tp1")] == [False, False, True] * 2
    for name in ("tp2", "grid"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / name)), torch.tensor(reference), rtol=1e-4, atol=1e-5)
    # The sharded checkpoints consolidate to the TP=1 weights (ZeRO partitions merged, TP shards joined).
    from pipeline.config import load_config
    from pipeline.checkpoint.consolidate import consolidate

    model = load_config(None, overrides(data, tmp_path)).model
    full = {name: consolidate(tmp_path / name / "checkpoints", model) for name in ("tp1", "tp2", "grid")}
    assert full["tp1"]["embed.weight"].shape == (1024, 64)
    for name in ("tp2", "grid"):
        assert full[name].keys() == full["tp1"].keys()
        for key, tensor in full["tp1"].items():
            torch.testing.assert_close(full[name][key], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_stop_and_resume_is_exact(data, tmp_path):
    steps = {"train.steps": 8, "train.save_every": 4}
    run_ranks(train_rank, 2, overrides(data, tmp_path / "straight", **steps))
    run_ranks(train_rank, 2, overrides(data, tmp_path / "resumed", **steps, **{"train.exit_after": 4}))
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "step_00000004"
    run_ranks(train_rank, 2, overrides(data, tmp_path / "resumed", **steps))
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == list(range(1, 9))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def nan_rank(args: list[str], bad_batches: list[int]) -> None:
    """Train with NaN written into the loss mask of the given language batches (counted from 0)."""
    from pipeline.data import loaders

    clean, calls = loaders.collate_language, {"n": 0}

    def poisoned(samples):
        batch = clean(samples)
        if calls["n"] in bad_batches:
            batch["loss_mask"][0, 0] = float("nan")
        calls["n"] += 1
        return batch

    loaders.collate_language = poisoned
    train_rank(args)


def test_a_nan_batch_is_skipped_and_counted(data, tmp_path):
    run_ranks(nan_rank, 1, overrides(data, tmp_path, **{"train.steps": 6}), [1])
    rows = metrics(tmp_path)
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]  # language batch 1 is step 3
    assert rows[2]["loss/language"] is None and "train/grad_norm" not in rows[2]
    assert all(isinstance(r.get("loss/language", 0.0), float) for r in rows[3:])


def test_consecutive_nan_steps_stop_with_the_checkpoint_intact(data, tmp_path):
    args = overrides(data, tmp_path, **{"train.steps": 20, "train.save_every": 2, "train.max_consecutive_skips": 2,
                                        "train.schedule": "mixed"})
    with pytest.raises(Exception, match="non-finite loss or gradients for 2 consecutive steps"):
        run_ranks(nan_rank, 1, args, [2, 3, 4, 5])
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
    rows = metrics(tmp_path)
    assert all("loss/language" in r and "loss/teacher" in r for r in rows)  # mixed: both signals every step


def test_zero_stages_and_activation_checkpointing_give_the_same_losses(data, tmp_path):
    """fp32 on one process: ZeRO-3 is the reference; ZeRO-1, ZeRO-2 and activation checkpointing change how
    memory is spent, not the numbers."""
    steps = {"train.steps": 4}
    run_ranks(train_rank, 1, overrides(data, tmp_path / "zero3", **steps))
    run_ranks(train_rank, 1, overrides(data, tmp_path / "ac", **steps, **{"train.activation_checkpointing": "true"}))
    for stage in (1, 2):
        ds_config = json.loads((REPO / "ds_configs" / f"zero{stage}_bf16.json").read_text())
        del ds_config["bf16"]  # these CPUs have no bf16 units: compare in fp32
        (tmp_path / f"zero{stage}.json").write_text(json.dumps(ds_config))
        run_ranks(train_rank, 1, overrides(data, tmp_path / f"run{stage}", **steps,
                                           **{"train.ds_config": tmp_path / f"zero{stage}.json"}))
    reference = torch.tensor(losses(tmp_path / "zero3"))
    for name in ("ac", "run1", "run2"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / name)), reference, rtol=1e-5, atol=1e-6)


def test_zero0_over_tp2_x_dp2_trains_resumes_and_consolidates_as_zero3(data, tmp_path):
    """ZeRO stage 0 (plain data parallelism, `ds_configs/zero0.json`) on TP=2 x DP=2, stopped after 2 steps and
    resumed: the losses and gradient norms (computed by the trainer: DeepSpeed's stage 0 drops its norm) of
    ZeRO-3 on the same grid, and its checkpoint (the module's weights, no partitions) consolidates to the
    same weights."""
    from pipeline.checkpoint.consolidate import consolidate
    from pipeline.config import load_config

    grid = {"train.steps": 4, "parallel.tensor_parallel": 2, "train.micro_batch": 4, "train.teacher_micro_batch": 8}
    zero0 = {**grid, "train.ds_config": REPO / "ds_configs" / "zero0.json"}
    run_ranks(train_rank, 4, overrides(data, tmp_path / "zero3", **grid))
    run_ranks(train_rank, 4, overrides(data, tmp_path / "zero0", **zero0, **{"train.exit_after": 2}))
    run_ranks(train_rank, 4, overrides(data, tmp_path / "zero0", **zero0))
    reference, rows = metrics(tmp_path / "zero3"), metrics(tmp_path / "zero0")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss/language", "loss/teacher", "train/grad_norm"):
        assert len(series(rows, key)) == len(series(reference, key)) > 0, key
        torch.testing.assert_close(torch.tensor(series(rows, key)), torch.tensor(series(reference, key)),
                                   rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    model = load_config(None, overrides(data, tmp_path)).model
    weights, expected = (consolidate(tmp_path / name / "checkpoints", model) for name in ("zero0", "zero3"))
    assert weights.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def train_twice_rank(runs: list[list[str]], out: str) -> None:
    """Train each run in this process, as a benchmark or a notebook does; after each, count the models still
    alive."""
    import gc

    from pipeline.model.freelm import FreeLM

    alive = []
    for args in runs:
        train_rank(args)
        gc.collect()
        alive.append(sum(isinstance(obj, FreeLM) for obj in gc.get_objects()))
    Path(out).write_text(json.dumps(alive))


def test_train_in_process_releases_its_model_and_can_skip_checkpoints(data, tmp_path):
    """Under ZeRO-1, nothing holds the model after `train()` returns (DeepSpeed's hooks and name tables did
    until the engine was destroyed: a second run in the process kept the first one's weights, gradients and
    optimizer states), and `train.checkpoints=false` writes none. (ZeRO-3 still leaks, in DeepSpeed itself:
    an unbounded `lru_cache` on a PartitionedParameterCoordinator method holds the coordinator and modules.)"""
    zero1 = {"train.steps": 2, "train.checkpoints": "false", "train.ds_config": REPO / "ds_configs" / "zero1.json"}
    runs = [overrides(data, tmp_path / "first", **zero1), overrides(data, tmp_path / "second", **zero1)]
    run_ranks(train_twice_rank, 1, runs, str(tmp_path / "alive.json"))
    assert json.loads((tmp_path / "alive.json").read_text()) == [0, 0]
    assert [len(metrics(tmp_path / name)) for name in ("first", "second")] == [2, 2]
    assert not (tmp_path / "first" / "checkpoints").exists() and not (tmp_path / "second" / "checkpoints").exists()


def test_accumulated_micro_batches_train_as_the_whole_batch(data, tmp_path):
    """A step over two micro-batches of each signal (`grad_accum`, `teacher_grad_accum`, each backward scaled
    by DeepSpeed's boundary left to the trainer) equals one micro-batch twice the size: the same sequences and
    propositions per step (length grouping works per step), the same losses, hence the same updates."""
    steps = {"train.steps": 6}
    run_ranks(train_rank, 1, overrides(data, tmp_path / "whole", **steps))
    run_ranks(train_rank, 1, overrides(data, tmp_path / "accumulated", **steps, **{
        "train.micro_batch": 4, "train.grad_accum": 2, "train.teacher_micro_batch": 8, "train.teacher_grad_accum": 2}))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "accumulated")), torch.tensor(losses(tmp_path / "whole")),
                               rtol=1e-5, atol=1e-6)


def compiled_train_rank(args: list[str], out: str) -> None:
    """`train_rank`, then what dynamo compiled on rank 0: its frame and graph counters, written to `out`."""
    from torch._dynamo.utils import counters

    train_rank(args)
    if os.environ["RANK"] == "0":
        Path(out).write_text(json.dumps({name: dict(counters[name]) for name in ("frames", "stats")}))


def test_compiled_blocks_give_the_eager_losses_at_tp1_and_tp2(data, tmp_path):
    """ZeRO-3 (fp32) with `train.compile`: every block compiled by inductor, DeepSpeed's gather hooks around
    each block's graph; TP=2's compiled blocks hold megatron-core's parallel layers. At TP=1 dynamo compiles the
    blocks' shared forward twice (language batches, then teacher batches with dynamic shapes) and no hook of
    DeepSpeed's (compiling the blocks' whole call traced ZeRO-3's hooks: 61 frames in these 4 steps). At TP=2
    megatron-core's collectives break the block into several graphs."""
    steps = {"train.steps": 4}
    for tp in (1, 2):
        grid = {"parallel.tensor_parallel": tp}
        run_ranks(train_rank, tp, overrides(data, tmp_path / f"eager{tp}", **steps, **grid))
        run_ranks(compiled_train_rank, tp, overrides(data, tmp_path / f"compiled{tp}", **steps, **grid,
                                                     **{"train.compile": "true"}), str(tmp_path / f"dynamo{tp}"))
        torch.testing.assert_close(torch.tensor(losses(tmp_path / f"compiled{tp}")),
                                   torch.tensor(losses(tmp_path / f"eager{tp}")), rtol=1e-4, atol=1e-5)
    compiled = json.loads((tmp_path / "dynamo1").read_text())  # TP=1
    assert (compiled["frames"], compiled["stats"]["unique_graphs"]) == ({"total": 2, "ok": 2}, 2), compiled


def test_bf16_zero3_trains(data, tmp_path):
    out = launch("deepspeed", 1, overrides(data, tmp_path, **{
        "train.steps": 4, "train.micro_batch": 2, "train.teacher_micro_batch": 4,
        "train.ds_config": REPO / "ds_configs" / "zero3_bf16.json"}))
    assert "precision bf16" in out.stdout + out.stderr
    assert all(0 < value < 10 for value in losses(tmp_path))


def test_mlflow_server_gets_both_series_and_an_outage_does_not_stop_training(data, tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path / "mlflow")
    (tmp_path / "mlflow").mkdir()
    server.start()
    run = tmp_path / "run"
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    args = overrides(data, run, **{"train.steps": 60, "tracking.uri": server.uri})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        at_kill = wait_for_lines(run / "metrics.jsonl", 10, proc)
        server.stop(signal.SIGKILL)
        during = wait_for_lines(run / "metrics.jsonl", at_kill + 5, proc)
        assert during >= at_kill + 5  # training went on while the server was down
        server.start()
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        assert "unreachable" in stderr
        assert [row["step"] for row in metrics(run)] == list(range(1, 61))
        run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
        client = MlflowClient(server.uri)
        for key in ("loss/language", "loss/teacher"):
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(
                range(1 if key == "loss/language" else 2, 61, 2))
        assert client.get_run(run_id).data.params["model.preset"] == "tiny"
    finally:
        proc.kill()
        server.stop()


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen | None, timeout: float = 120.0) -> int:
    """Wait until `path` has `count` lines (giving up if `proc`, the process writing it, has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        lines = len(path.read_text().splitlines()) if path.exists() else 0
        if lines >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} lines (writer exit code: {proc and proc.poll()})")


def test_batch_geometry_has_one_source_of_truth(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.parallel.ds_config import deepspeed_config

    filled = deepspeed_config(REPO / "ds_configs" / "zero3_bf16.json", micro_batch=4, grad_accum=2, grad_clip=0.5)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (4, 2)
    assert filled["gradient_clipping"] == 0.5 and filled["zero_optimization"]["stage"] == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="sets 'gradient_accumulation_steps'; it comes from the recipe"):
        deepspeed_config(bad, 4, 2, 1.0)


def test_a_stop_signal_checkpoints_and_the_next_job_resumes(data, tmp_path):
    """What SLURM's pre-timeout signal does: checkpoint, exit cleanly; the next job continues, no step trained
    twice or skipped."""
    args = overrides(data, tmp_path, **{"train.steps": 40, "train.save_every": 1000})
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(tmp_path / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = len(metrics(tmp_path))
    assert stopped_at < 40 and f"checkpoint at step {stopped_at} saved" in stderr
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    assert [row["step"] for row in metrics(tmp_path)] == list(range(1, 41))
