"""Smoke tests of the local SLURM cluster helper: multi-task batch jobs, and requeue on a signal."""

from __future__ import annotations

import time
from pathlib import Path


from slurm_cluster import SlurmCluster


def _script(cluster: SlurmCluster, name: str, body: str) -> Path:
    path = cluster.workdir / name
    path.write_text("#!/bin/bash\n" + body)
    return path


def test_two_task_batch_job(cluster: SlurmCluster):
    out = cluster.workdir / "tasks.out"
    script = _script(cluster, "tasks.sh", f"""\
#SBATCH --ntasks=2
#SBATCH --output={out}
srun hostname
srun bash -c 'echo "rank=$SLURM_PROCID"'
""")
    start = time.monotonic()
    job = cluster.sbatch(script, wait=True, timeout=120)
    print(f"[slurm] 2-task job {job} took {time.monotonic() - start:.1f} s")
    assert cluster.job_state(job) == "COMPLETED", out.read_text()
    lines = out.read_text().splitlines()
    assert {"rank=0", "rank=1"} <= set(lines), lines
    assert cluster.job_field(job, "ExitCode") == "0:0"


def test_requeue_on_signal(cluster: SlurmCluster):
    """The batch shell traps USR1, requeues its own job and exits; the second run finishes by itself."""
    marker, out = cluster.workdir / "starts.txt", cluster.workdir / "requeue.out"
    script = _script(cluster, "requeue.sh", f"""\
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}
trap 'echo "got USR1"; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> {marker}
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "second run done"; exit 0; fi
for _ in $(seq 600); do sleep 0.2; done  # short sleeps: bash runs the trap once the current one returns
exit 1
""")
    start = time.monotonic()
    job = cluster.sbatch(script)
    cluster.wait_state(job, {"RUNNING"}, timeout=60)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:  # RUNNING comes before the trap is set
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    cluster.wait_state(job, {"COMPLETED"}, timeout=90)
    print(f"[slurm] requeue round trip of job {job} took {time.monotonic() - start:.1f} s")
    assert marker.read_text().splitlines() == ["restart=0", "restart=1"]
    assert cluster.job_field(job, "Restarts") == "1"
    assert "got USR1" in out.read_text() and "second run done" in out.read_text()
