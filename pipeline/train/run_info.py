"""What an MLflow run says about itself beyond its metrics (tags naming the code, command and grid that made
it), where its store and artifacts live, and the link that opens it."""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow's classification of an experiment: model training, not GenAI (traces). MLflow 3.17's UI picks its
# view from a global GenAI / Model training switch (default: GenAI) instead; `workflowType=machine_learning`
# in a link sets that switch.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW_QUERY = "workflowType=machine_learning"
SOURCE = Path(__file__).resolve().parents[2]


def git_commit(path: Path = SOURCE) -> tuple[str, bool] | None:
    """(commit, has uncommitted changes) of the pipeline's own source tree; None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (what `mlflow.start_run` would set) plus the full command line."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "freelm train",
            "freelm.command": shlex.join(sys.argv)}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    if (commit := git_commit()) is not None:
        tags["mlflow.source.git.commit"] = commit[0]
        tags["freelm.git_dirty"] = str(commit[1]).lower()
    return tags


SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside it (`mlartifacts/` next to the .db file), not to `./mlruns`
    under whatever directory the job started in; a tracking server decides for itself (None)."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def create_local_store(path: Path) -> None:
    """Create the SQLite store under another name and move it into place once MLflow has built its tables:
    a job killed while MLflow creates them (several transactions) would leave a store it cannot open again."""
    if path.exists():
        return
    from mlflow.tracking import MlflowClient

    tmp = path.with_name(f".{path.name}.init")
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
        leftover.unlink(missing_ok=True)
    MlflowClient(f"sqlite:///{tmp}").search_experiments()  # opening the store creates the tables
    os.replace(tmp, path)


def system_monitor(run_id: str, uri: str, interval: float) -> Any:
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPUs with nvidia-ml-py) on this host,
    started; None where it cannot run (it needs psutil)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:
        log.info("no system metrics in MLflow (%s)", exc)
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def run_link(ui: str, experiment_id: str, run_id: str) -> str:
    """The metrics page of a run in the MLflow UI served at `ui`, in the model-training view."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{WORKFLOW_QUERY}"
