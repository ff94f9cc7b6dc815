"""Reporting evaluation results: the table, the JSON file, and the training run's MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pipeline.eval.metrics import TaskResult


def format_table(results: Sequence[TaskResult]) -> str:
    lines = [f"{'task':<16}{'n':>7}{'FreeLM acc':>12}{'F1':>8}{'MCC':>8}{'LM-only':>10}{'majority':>10}"]
    for r in results:
        extra = "".join(f"{v:>8.3f}" if v is not None else f"{'-':>8}" for v in (r.f1, r.mcc))
        lines.append(f"{r.task:<16}{r.n:>7}{r.accuracy:>12.3f}{extra}{r.lm_only:>10.3f}{r.majority:>10.3f}")
    return "\n".join(lines)


def write_json(path: str | Path, checkpoint: str | Path, split: str, results: Sequence[TaskResult],
               ppl: float | None) -> None:
    report = {"checkpoint": str(checkpoint), "split": split, "tasks": [asdict(r) for r in results], "perplexity": ppl}
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def log_to_mlflow(run_dir: str | Path, split: str, results: Sequence[TaskResult], ppl: float | None) -> str:
    """Add the results to the training run's MLflow run (from run_dir/mlflow_run.json) as `eval/<split>/...`
    metrics at the checkpoint's step; returns the run id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint.io import latest_tag

    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    step = int(latest_tag(run_dir / "checkpoints").split("_")[-1])
    now = int(time.time() * 1000)
    values = {f"eval/{split}/perplexity": ppl} if ppl is not None else {}
    for r in results:
        for key in ("accuracy", "majority", "lm_only", "f1", "mcc"):
            if getattr(r, key) is not None:
                values[f"eval/{split}/{r.task}/{key}"] = getattr(r, key)
    metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
    MlflowClient(saved["tracking_uri"]).log_batch(saved["run_id"], metrics=metrics)
    return saved["run_id"]
