"""Training across two nodes for real, on the two-node SLURM cluster the session builds on this machine
(tests/two_node_cluster.py: node1 and node2 are network namespaces, each with its own slurmd and sshd).

- slurm/train.sh on 2 nodes x 2 tasks, TP=2 x DP=2: each TP group inside one node, DP across the nodes; the
  losses, grad norms and final weights are bit-identical to the same 4 ranks on one node.
- A two-node job signalled before its time limit checkpoints, requeues and resumes; one whose rank on node2 is
  killed is restarted by slurm/train.sh from its checkpoint. Both end COMPLETED with every step once in
  metrics.jsonl and in MLflow, and losses equal to an uninterrupted run's.
- The deepspeed launcher over ssh (pdsh) and torchrun under srun, each with the commands README.md gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from distributed import free_port, run_ranks
from test_slurm import job_log
from test_train import REPO, metrics, overrides, series, train_rank, wait_for_lines
from two_node_cluster import TwoNodeCluster

TRAIN_SH, TORCHRUN_SH = REPO / "slurm" / "train.sh", REPO / "slurm" / "torchrun.sh"
# TP=2 x DP=2 with the global batch of tests/test_train.py's grid test (8 sequences, 16 propositions per step)
GRID = {"parallel.tensor_parallel": 2, "train.micro_batch": 4, "train.teacher_micro_batch": 8}
COMPARED = ("step", "loss/language", "loss/teacher", "teacher/accuracy", "train/lr", "train/grad_norm",
            "train/skipped_steps")


@pytest.fixture(scope="module")
def ops_built() -> None:
    """DeepSpeed JIT-builds its CPU comm op on first use into TORCH_EXTENSIONS_DIR (slurm/env.sh's value), which
    both nodes share: build it here once, so that ranks of two nodes never race to build it."""
    build = ("source slurm/env.sh && exec .venv/bin/python -c 'from deepspeed.accelerator import get_accelerator; "
             "get_accelerator().create_op_builder(\"ShareMemCommBuilder\").load()'")
    subprocess.run(["bash", "-c", build], cwd=REPO, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> list[dict]:
    """The 40-step, 2-rank run the interrupted jobs below must reproduce: its metrics.jsonl rows."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ranks(train_rank, 2, overrides(data, run, **{"train.steps": 40}))
    return metrics(run)


def submit(cluster: TwoNodeCluster, script: Path, data: Path, run: Path, tasks_per_node: int,
           cpus_per_task: int = 1, env: dict[str, str] | None = None, **extra) -> int:
    """`sbatch --nodes=2 SCRIPT recipes/tiny.yaml key=value...`, with this machine's resources given to sbatch."""
    resources = ["--chdir", str(REPO), "--output", str(run.parent / f"{run.name}-%j.log"), "--partition", "debug",
                 "--nodes", "2", "--ntasks-per-node", str(tasks_per_node), "--gpus-per-node", "0",
                 "--cpus-per-task", str(cpus_per_task), "--time", "10:00"]
    args = ["recipes/tiny.yaml", *overrides(data, run, **extra)]
    return cluster.sbatch(script, *resources, script_args=args, timeout=60, env=env)


def compared(run: Path) -> list[dict]:
    """What metrics.jsonl holds besides wall-clock measurements (time, tokens/s, MFU)."""
    return [{key: row[key] for key in COMPARED if key in row} for row in metrics(run)]


def mlflow_history(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point MLflow holds for `key` in the run's MLflow run, in step order."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def mlflow_runs(run: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def readme_block(heading: str) -> str:
    """The first ```bash block after the paragraph starting with `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(re.escape(heading) + r".*?\n```bash\n(.*?)\n```", text, re.S)
    assert match, f"README.md has no bash block after {heading!r}"
    return match.group(1)


def test_the_nodes_are_two_hosts(two_nodes: TwoNodeCluster, tmp_path):
    """One task per node: each sees its own hostname and address; ssh goes from node1 to node2."""
    out = tmp_path / "hosts.out"
    script = tmp_path / "hosts.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo $SLURM_PROCID $(hostname) $(hostname -I)'\n")
    job = two_nodes.sbatch(script, "--nodes=2", "--ntasks-per-node=1", "--output", str(out))
    assert two_nodes.wait_ended(job, timeout=60) == "COMPLETED", out.read_text()
    assert sorted(out.read_text().splitlines()) == ["0 node1 10.213.47.1", "1 node2 10.213.47.2"]
    assert two_nodes.nodeexec(1, "ssh", "node2", "hostname").stdout == "node2\n"


def test_tp2_x_dp2_across_two_nodes_matches_one_node(two_nodes: TwoNodeCluster, data, ops_built,
                                                     tmp_path):
    """slurm/train.sh on 2 nodes x 2 tasks: ranks 0-1 on node1, 2-3 on node2, so each TP group stays inside a
    node and DP goes across; metrics and weights equal, bit for bit, those of the same 4 ranks on one node."""
    from megatron.core.parallel_state import RankGenerator

    run, single = tmp_path / "two-nodes", tmp_path / "one-node"
    # SLURM runs this on each node just before each task: where every rank runs
    prolog = tmp_path / "task_prolog.sh"
    prolog.write_text(f"#!/bin/sh\necho \"$SLURM_PROCID $(hostname)\" >> {tmp_path / 'placement'}\n")
    prolog.chmod(0o755)
    job = submit(two_nodes, TRAIN_SH, data, run, tasks_per_node=2, env={"SLURM_TASK_PROLOG": str(prolog)},
                 **GRID, **{"train.steps": 6})
    state, log = two_nodes.wait_ended(job, timeout=400), job_log(run, job)
    assert state == "COMPLETED", log[-3000:]
    assert "grid: world 4 = TP 2 x DP 2" in log
    placement = dict(line.split() for line in (tmp_path / "placement").read_text().splitlines())
    assert placement == {"0": "node1", "1": "node1", "2": "node2", "3": "node2"}
    # megatron-core's TP=2 x DP=2 grid in its default order (init_parallel's): TP groups are consecutive ranks
    grid = RankGenerator(tp=2, ep=1, dp=2, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    assert [[placement[str(r)] for r in group] for group in grid.get_ranks("tp")] == [["node1"] * 2, ["node2"] * 2]
    assert [[placement[str(r)] for r in group] for group in grid.get_ranks("dp")] == [["node1", "node2"]] * 2

    # The same 4 ranks on one node (the host), in the environment slurm/train.sh gives its tasks.
    env = {**two_nodes.env, "OMP_NUM_THREADS": "1"}
    reference = (".venv/bin/torchrun --nproc_per_node 4 --master_port {port} -m pipeline.cli train "
                 "--config recipes/tiny.yaml \"$@\"").format(port=free_port())
    out = subprocess.run(["bash", "-c", f"source slurm/env.sh && {reference}", "bash",
                          *overrides(data, single, **GRID, **{"train.steps": 6})],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # Bit-identical: every collective is between the same ranks in the same order (gloo on both sides), and
    # a reduction over two values (the DP and TP groups' size) does not depend on the order anyway.
    assert [row["step"] for row in metrics(run)] == list(range(1, 7))
    assert compared(run) == compared(single)
    assert all("train/grad_norm" in row for row in compared(run))
    from pipeline.checkpoint.consolidate import consolidate
    from pipeline.config import load_config

    model = load_config(None, overrides(data, run, **GRID)).model
    two, one = consolidate(run / "checkpoints", model), consolidate(single / "checkpoints", model)
    assert two.keys() == one.keys() and all(two[key].equal(one[key]) for key in one)

    # Every rank wrote its shards: ranks 0-1 on node1 hold DP rank 0, ranks 2-3 on node2 DP rank 1.
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    written = {path.name for path in (run / "checkpoints" / "step_00000006").iterdir()}
    assert {f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_{kind}_states.pt" for dp in (0, 1) for tp in (0, 1)
            for kind in ("model", "optim")} | {f"rng_rank{rank:05d}.pt" for rank in range(4)} <= written

    # The MLflow run is complete: finished, and holds exactly what metrics.jsonl has.
    (mlflow_run,) = mlflow_runs(run)
    assert mlflow_run.info.status == "FINISHED"
    rows = metrics(run)
    for key in ("loss/language", "loss/teacher", "train/lr", "train/grad_norm"):
        assert mlflow_history(run, key) == [(row["step"], row[key]) for row in rows if key in row]


def test_preempted_two_node_job_requeues_and_resumes(two_nodes: TwoNodeCluster, data, ops_built,
                                                    uninterrupted, tmp_path):
    """The pre-timeout signal reaches the ranks on both nodes: they checkpoint at the same step, the job
    requeues itself and resumes there on both nodes, every step once in metrics.jsonl and in MLflow."""
    run = tmp_path / "run"
    job = submit(two_nodes, TRAIN_SH, data, run, tasks_per_node=1, **{"train.steps": 40})
    two_nodes.wait_state(job, {"RUNNING"}, timeout=120)
    assert two_nodes.job_field(job, "NodeList") == "node[1-2]"
    wait_for_lines(run / "metrics.jsonl", 6, None, timeout=240)
    two_nodes.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@300 sends
    state, log = two_nodes.wait_ended(job, timeout=400), job_log(run, job)
    assert state == "COMPLETED", log[-3000:]
    assert "time limit near" in log and log.count("grid: world 2 = TP 1 x DP 2") == 2
    stopped = int(re.search(r"checkpoint at step (\d+) saved", log).group(1))
    assert 6 <= stopped < 40 and f"(resuming at step {stopped})" in log
    assert two_nodes.job_field(job, "Restarts") == "1"
    assert two_nodes.job_field(job, "NodeList") == "node[1-2]"  # the requeued job ran on both nodes again
    assert (run / "checkpoints" / "latest").read_text() == "step_00000040"
    # Every step once, none skipped, in metrics.jsonl and in the one MLflow run (interactive 1:1 schedule).
    rows = metrics(run)
    assert [row["step"] for row in rows] == list(range(1, 41))
    (mlflow_run,) = mlflow_runs(run)
    assert mlflow_run.info.status == "FINISHED"
    assert [step for step, _ in mlflow_history(run, "train/lr")] == list(range(1, 41))
    assert [step for step, _ in mlflow_history(run, "loss/language")] == list(range(1, 41, 2))
    assert [step for step, _ in mlflow_history(run, "loss/teacher")] == list(range(2, 41, 2))
    for key in ("loss/language", "loss/teacher"):
        assert mlflow_history(run, key) == [(row["step"], row[key]) for row in rows if key in row]
        assert series(rows, key) == series(uninterrupted, key)  # fp32 on CPU: exact


def rank_pid(cluster: TwoNodeCluster, run: Path, rank: int) -> int:
    """The PID of the training task with SLURM_PROCID=`rank` of the run in `run`."""
    for pid in cluster.pids_running(f"train.run_dir={run}"):
        with contextlib.suppress(OSError):
            if f"SLURM_PROCID={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no rank {rank} of {run} is running")


def test_a_killed_rank_on_node2_is_restarted_from_the_checkpoint(two_nodes: TwoNodeCluster, data, ops_built,
                                                                 uninterrupted, tmp_path):
    """SIGKILL to the rank on node2 mid-run: srun ends the step on both nodes, slurm/train.sh relaunches it
    from the latest checkpoint, and the job ends COMPLETED with the uninterrupted run's losses."""
    run = tmp_path / "run"
    job = submit(two_nodes, TRAIN_SH, data, run, tasks_per_node=1, env={"FREELM_RESTART_DELAY": "1"},
                 **{"train.steps": 40, "train.save_every": 5})
    two_nodes.wait_state(job, {"RUNNING"}, timeout=120)
    wait_for_lines(run / "metrics.jsonl", 12, None, timeout=240)
    os.kill(rank_pid(two_nodes, run, 1), signal.SIGKILL)
    state, log = two_nodes.wait_ended(job, timeout=400), job_log(run, job)
    assert state == "COMPLETED", log[-3000:]
    assert log.count("restart 1 of 3 in 1 s, from the latest complete checkpoint") == 1 and "restart 2" not in log
    resumed = int(re.search(r"\(resuming at step (\d+)\)", log).group(1))
    assert resumed >= 10 and resumed % 5 == 0
    assert two_nodes.job_field(job, "Restarts") == "0"  # the script restarted the step; SLURM did not requeue
    rows = metrics(run)
    assert [row["step"] for row in rows] == list(range(1, 41))  # steps after the checkpoint: trained twice, once here
    (mlflow_run,) = mlflow_runs(run)
    assert mlflow_run.info.status == "FINISHED"
    for key in ("loss/language", "loss/teacher", "train/lr"):
        assert series(rows, key) == series(uninterrupted, key)  # fp32 on CPU: exact
        assert mlflow_history(run, key) == [(row["step"], row[key]) for row in rows if key in row]


def test_deepspeed_launcher_across_two_nodes(two_nodes: TwoNodeCluster, data, ops_built, tmp_path):
    """README's commands, run on node1 inside a two-node allocation: the launcher reaches both nodes over ssh
    (pdsh, with the cluster's ssh first on PATH). Run in a directory that looks like the checkout, so that the
    hostfile lands there."""
    block = readme_block("**The deepspeed launcher across nodes**").splitlines()
    assert block[0].startswith("salloc --nodes=2 ")  # the allocation: made below with this machine's resources
    script = "\n".join(block[1:])
    assert script.count("recipes/1.3b.yaml") == 1
    script = script.replace("recipes/1.3b.yaml", 'recipes/tiny.yaml "$@"')
    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    for name in ("slurm", "recipes"):
        (work / name).symlink_to(REPO / name)
    path = f"{two_nodes.bin_dir}{os.pathsep}{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    allocation = ["salloc", "--nodes=2", "--ntasks-per-node=1", "--partition=debug", "--time=10:00"]
    try:
        out = two_nodes.nodeexec(1, *allocation, "bash", "-c", script, "bash",
                                 *overrides(data, run, **{"train.steps": 6}),
                                 check=False, timeout=300, cwd=work, env={"PATH": path})
    except subprocess.TimeoutExpired:
        for pid in two_nodes.pids_running(str(run)):  # the ranks, by PID (never signal the pdsh launcher)
            os.kill(pid, signal.SIGKILL)
        raise
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (work / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    output = out.stdout + out.stderr
    for node in ("node1", "node2"):  # pdsh prefixes each line with the node it came from
        assert re.search(rf"^{node}: .*Process \d+ exits successfully", output, re.M), output[-4000:]
    assert re.search(r"^node1: .*grid: world 2 = TP 1 x DP 2", output, re.M)
    assert [row["step"] for row in metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    written = {path.name for path in (run / "checkpoints" / "step_00000006").iterdir()}
    assert {"rng_rank00000.pt", "rng_rank00001.pt"} <= written


def test_torchrun_under_srun_across_two_nodes(two_nodes: TwoNodeCluster, data, ops_built, tmp_path):
    """slurm/torchrun.sh as README.md gives it: one torchrun per node, c10d rendezvous on node1."""
    block = readme_block("**torchrun under srun across nodes**")
    command = next(line for line in block.splitlines() if "slurm/torchrun.sh" in line)
    assert shlex.split(command)[:4] == ["sbatch", "--nodes=2", "slurm/torchrun.sh", "recipes/1.3b.yaml"]
    run = tmp_path / "run"
    job = submit(two_nodes, TORCHRUN_SH, data, run, tasks_per_node=1, cpus_per_task=2, env={"NPROC_PER_NODE": "2"},
                 **GRID, **{"train.steps": 6})
    state, log = two_nodes.wait_ended(job, timeout=400), job_log(run, job)
    assert state == "COMPLETED", log[-3000:]
    assert two_nodes.job_field(job, "NodeList") == "node[1-2]"
    assert "on 2 node(s) x 2 processes, rendezvous node1:" in log and "grid: world 4 = TP 2 x DP 2" in log
    assert [row["step"] for row in metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    written = {path.name for path in (run / "checkpoints" / "step_00000006").iterdir()}
    assert {f"rng_rank{rank:05d}.pt" for rank in range(4)} <= written
