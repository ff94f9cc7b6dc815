"""What a resumed job leaves behind: every step once in metrics.jsonl and in MLflow, and only the checkpoints
that retention keeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from distributed import run_ranks, start_cli_ranks
from test_train import REPO, metrics, overrides, train_rank, wait_for_lines


def mlflow_steps(run_dir: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    history = MlflowClient(saved["tracking_uri"]).get_metric_history(saved["run_id"], key)
    return sorted((m.step, m.value) for m in history)


def test_a_job_resumed_after_a_lost_segment_logs_every_step_once(data, tmp_path):
    run_dir = tmp_path / "run"
    args = {"train.save_every": 2, "train.keep_checkpoints": 0}
    run_ranks(train_rank, 2, overrides(data, run_dir, **{"train.steps": 6}, **args))
    first = {row["step"]: row["loss/language"] for row in metrics(run_dir) if "loss/language" in row}
    # The job died while saving step 6: `latest` still names step 4, and steps 5-6 are logged but lost.
    (run_dir / "checkpoints" / "latest").write_text("step_00000004")
    with open(run_dir / "metrics.jsonl", "a") as jsonl:
        jsonl.write('{"step": 7, "loss/lang')  # and its last line was cut short
    run_ranks(train_rank, 2, overrides(data, run_dir, **{"train.steps": 8}, **args))
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    resumed = {row["step"]: row["loss/language"] for row in rows if "loss/language" in row}
    assert {step: resumed[step] for step in first} == first  # exact resume: steps 5-6 trained again, equal
    for key in ("train/lr", "loss/language", "loss/teacher"):
        steps = [step for step, _ in mlflow_steps(run_dir, key)]
        assert steps == sorted(set(steps)) and set(steps) == {r["step"] for r in rows if key in r}


def test_retention_keeps_the_newest_and_every_kth_checkpoint(data, tmp_path):
    run_dir = tmp_path / "run"
    run_ranks(train_rank, 1, overrides(data, run_dir, **{"train.steps": 6, "train.save_every": 1,
                                                         "train.keep_checkpoints": 2, "train.keep_every": 4}))
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000005", "step_00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"


def test_the_trainers_own_state_loads_without_unpickling_objects(data, tmp_path):
    import torch

    from pipeline.checkpoint.consolidate import load_checkpoint_file

    run_dir = tmp_path / "run"
    run_ranks(train_rank, 1, overrides(data, run_dir, **{"train.steps": 2}))
    step = run_dir / "checkpoints" / "step_00000002"
    rng = torch.load(step / "rng_rank00000.pt", weights_only=True)
    assert set(rng) == {"python", "numpy", "torch"}
    trainer = load_checkpoint_file(step / "zero_pp_rank_0_mp_rank_00_model_states.pt")["trainer"]  # weights only
    assert trainer["step"] == 2 and set(trainer["streams"]) == {"language", "teacher"}


def test_sigterm_to_every_process_with_loader_workers_checkpoints_on_every_rank(data, tmp_path):
    """What slurmstepd does on scancel or preemption: SIGTERM to every process of the step, loader workers
    included. Two ranks started as srun starts them (one process each), two workers per stream."""
    args = overrides(data, tmp_path, **{"train.steps": 60, "train.save_every": 1000, "data.num_workers": 2})
    procs = start_cli_ranks(["train", *args], 2, REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_lines(tmp_path / "metrics.jsonl", 5, procs[0])
    os.killpg(procs[0].pid, signal.SIGTERM)
    errors = [proc.communicate(timeout=180)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    stopped_at = len(metrics(tmp_path))
    assert stopped_at < 60 and f"checkpoint at step {stopped_at} saved" in errors[0]
    assert "killed by signal" not in errors[0] + errors[1]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / f"step_{stopped_at:08d}").glob("rng_rank*")) == [
        "rng_rank00000.pt", "rng_rank00001.pt"]
