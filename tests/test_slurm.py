"""`sbatch slurm/train.sh` for real, on a single-node SLURM started by the test session: a 2-task job trains
to completion; a job signalled before its time limit checkpoints, requeues itself and finishes the run (also
when the save would outlast the limit); a config error is not retried. (A killed rank, restarted by the script: tests/test_multinode.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

from slurm_cluster import SlurmCluster
from test_train import REPO, metrics, overrides, series, wait_for_lines

TRAIN_SH = REPO / "slurm" / "train.sh"


def resources(log: Path, *extra: str) -> list[str]:
    """This machine's resources on the sbatch command line, over the template's GPU defaults."""
    return ["--chdir", str(REPO), "--output", str(log), "--partition", "debug", "--nodes", "1",
            "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10:00", *extra]


def submit(cluster: SlurmCluster, data: Path, run: Path, steps: int, wait: bool, *sbatch: str,
           **extra) -> int:
    """The template as users submit it: a recipe and overrides."""
    args = ["recipes/tiny.yaml", *overrides(data, run, **{"train.steps": steps, **extra})]
    return cluster.sbatch(TRAIN_SH, *resources(run.parent / f"{run.name}-%j.log", *sbatch), script_args=args,
                          wait=wait, timeout=600)


def job_log(run: Path, job: int) -> str:
    return (run.parent / f"{run.name}-{job}.log").read_text()


def test_sbatch_train_completes(cluster, data, tmp_path):
    run = tmp_path / "run"
    job = submit(cluster, data, run, steps=20, wait=True)
    assert cluster.job_state(job) == "COMPLETED", job_log(run, job)[-3000:]
    assert "grid: world 2 = TP 1 x DP 2" in job_log(run, job)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert len(series(rows, "loss/language")) == len(series(rows, "loss/teacher")) == 10
    assert (run / "checkpoints" / "latest").read_text() == "step_00000020"
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"]
    assert (run / "mlflow.db").exists()


def test_a_config_error_is_not_retried(cluster, data, tmp_path):
    """Overrides without a recipe take the default recipe (here FREELM_RECIPE); a bad value fails once."""
    run = tmp_path / "run"
    options = resources(tmp_path / "job-%j.log", "--export=ALL,FREELM_RESTART_DELAY=1,FREELM_RECIPE=recipes/tiny.yaml")
    job = cluster.sbatch(TRAIN_SH, *options, script_args=overrides(data, run, **{"train.steps": 0}), wait=True)
    log = (tmp_path / f"job-{job}.log").read_text()
    assert cluster.job_state(job) == "FAILED" and cluster.job_field(job, "ExitCode") == "2:0", log[-3000:]
    assert "recipe recipes/tiny.yaml model.preset=tiny" in log
    assert log.count("freelm: config error: train.steps must be >= 1, got 0") == 2  # once per rank, one attempt
    assert "exit code 2 (a config, data or checkpoint error): not retried" in log


def test_preempted_job_checkpoints_requeues_and_finishes(cluster, data, tmp_path):
    run = tmp_path / "run"
    job = submit(cluster, data, run, steps=40, wait=False)
    cluster.wait_state(job, {"RUNNING"}, timeout=120)
    wait_for_lines(run / "metrics.jsonl", 8, None, timeout=180)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@300 sends
    cluster.wait_state(job, {"COMPLETED"}, timeout=400)
    log = job_log(run, job)
    assert "time limit near" in log and "checkpoint at step" in log
    assert cluster.job_field(job, "Restarts") == "1"
    assert [r["step"] for r in metrics(run)] == list(range(1, 41))  # no step twice, none skipped
    assert (run / "checkpoints" / "latest").read_text() == "step_00000040"


def test_a_save_that_would_outlast_the_limit_still_requeues(cluster, data, tmp_path):
    """With no time left for a save (FREELM_REQUEUE_SLACK above the time left), the script requeues at once,
    without waiting for the trainer: the job resumes from whichever checkpoint is complete, every step once."""
    run = tmp_path / "run"
    job = submit(cluster, data, run, 40, False, "--export=ALL,FREELM_REQUEUE_SLACK=100000",
                 **{"train.save_every": 5})
    cluster.wait_state(job, {"RUNNING"}, timeout=120)
    wait_for_lines(run / "metrics.jsonl", 12, None, timeout=180)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    cluster.wait_state(job, {"COMPLETED"}, timeout=400)
    log = job_log(run, job)
    assert "the checkpoint did not finish 100000 s before the limit; requeueing anyway" in log
    assert int(re.search(r"\(resuming at step (\d+)\)", log).group(1)) >= 10
    assert cluster.job_field(job, "Restarts") == "1"
    assert [r["step"] for r in metrics(run)] == list(range(1, 41))
