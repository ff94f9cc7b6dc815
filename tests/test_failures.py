"""What clusters do to a run, one at a time, on 2 real ranks: a damaged newest checkpoint, a disk that fills up
during a save, a rank that stops answering, a rank killed outright. Each ends in one clear line and loses
nothing already saved."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from distributed import free_port, start_cli_ranks
from test_train import REPO, metrics, overrides, wait_for_lines


def train_ranks(args: list[str], world_size: int = 2, timeout: float = 300) -> tuple[list[int], list[str]]:
    """`freelm train` on `world_size` srun-style ranks; their exit codes and their stderr."""
    procs = start_cli_ranks(["train", *args], world_size, REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    errors = [proc.communicate(timeout=timeout)[1] for proc in procs]
    return [proc.returncode for proc in procs], errors


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss/language"] for row in metrics(run_dir) if "loss/language" in row}


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(data, tmp_path):
    run = tmp_path / "run"
    args = {"train.save_every": 2, "train.keep_checkpoints": 0}
    codes, errors = train_ranks(overrides(data, run, **{"train.steps": 6}, **args))
    assert codes == [0, 0], errors[0][-3000:]
    first = losses(run)
    shard = run / "checkpoints" / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)

    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "export-hf", "--checkpoint", str(run), "--out",
                          str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"freelm: data error: checkpoint {shard.parent} is damaged: {shard} is {size // 2:,} bytes, the manifest "
        f"says {size:,} (truncated or overwritten)")

    codes, errors = train_ranks(overrides(data, run, **{"train.steps": 8}, **args))
    assert codes == [0, 0], errors[0][-3000:]
    assert f"checkpoint step_00000006 is damaged: {shard} is {size // 2:,} bytes" in errors[0]
    assert "resuming from step_00000004, the newest complete checkpoint" in errors[0]
    assert [row["step"] for row in metrics(run)] == list(range(1, 9))
    resumed = losses(run)
    assert {step: resumed[step] for step in first} == first  # steps 5-6 trained again from step 4: equal
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_0000000{n}" for n in (2, 4, 6, 8)]
    assert [p.name.startswith("damaged_step_00000006_") for p in checkpoints.glob("damaged_*")] == [True]
    assert (checkpoints / "latest").read_text() == "step_00000008"


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int):
    """A tmpfs of `size_bytes` mounted at `path` (root only); unmounted at exit."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"cannot mount a tmpfs at {path}: {mounted.stderr}")
        pytest.skip(f"cannot mount a tmpfs for a full disk (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def test_a_full_disk_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(data, tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    codes, errors = train_ranks(overrides(data, probe, **{"train.steps": 1, "tracking.enabled": False}))
    assert codes == [0, 0], errors[0][-3000:]
    one = sum(f.stat().st_size for f in (probe / "checkpoints" / "step_00000001").rglob("*") if f.is_file())
    args = {"train.save_every": 2, "train.keep_checkpoints": 0, "train.steps": 6}
    with small_filesystem(run / "checkpoints", int(one * 1.5)):  # room for one checkpoint, not two
        codes, errors = train_ranks(overrides(data, run, **args))
        assert codes == [3, 3], errors[0][-3000:]
        step4 = run / "checkpoints" / "step_00000004"
        last = errors[0].strip().splitlines()[-1]
        assert last.startswith(f"freelm: checkpoint error: {step4}: saving step 4 failed on rank ")
        assert "no space left on device" in last
        assert last.endswith("The latest checkpoint is still step_00000002; nothing older was touched")
        assert not step4.exists() and (run / "checkpoints" / "latest").read_text() == "step_00000002"
        saved = run / "checkpoints" / "step_00000002"
        assert set(os.listdir(saved)) == set(os.listdir(probe / "checkpoints" / "step_00000001"))
        shutil.copytree(saved, tmp_path / "kept")  # what a user would do next: move it somewhere with room
    shutil.copytree(tmp_path / "kept", saved)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    codes, errors = train_ranks(overrides(data, run, **args))
    assert codes == [0, 0], errors[0][-3000:]
    assert "resuming at step 2" in errors[0] and (run / "checkpoints" / "latest").read_text() == "step_00000006"


def test_a_rank_that_stops_answering_fails_the_job_after_the_timeout_naming_rank_and_phase(data, tmp_path):
    args = overrides(data, tmp_path, **{"train.steps": 200, "parallel.timeout_minutes": 0.25})
    procs = start_cli_ranks(["train", *args], 2, REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_lines(tmp_path / "metrics.jsonl", 3, procs[0])
        procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        _, stderr = procs[0].communicate(timeout=120)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("freelm: training stopped: rank 0 of 2: step ")
    assert "failed after 15." in last and "Timed out waiting 15000ms" in last


def test_a_sigkilled_rank_ends_the_job_and_leaves_no_loader_worker_behind(data, tmp_path):
    """The deepspeed launcher stops the job when a rank dies; the dead rank's loader workers (children of a fork
    server, not of the rank) must end too, or they hold the job's output open and it never finishes."""
    args = overrides(data, tmp_path, **{"train.steps": 400, "data.num_workers": 2})
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "pipeline.cli", "train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    try:
        wait_for_lines(tmp_path / "metrics.jsonl", 3, proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in tree if "multiprocessing.forkserver" in " ".join(p.cmdline())]
        rank1 = [p for p in tree if "--local_rank=1" in p.cmdline()]
        assert len(rank1) == 1 and len(workers) >= 5, [p.cmdline()[-3:] for p in tree]  # servers and workers
        rank1[0].kill()
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "exits with return code = -9" in out
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
