"""Reporting evaluation results: the table, the JSON file, and the training run's MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pipeline.eval.metrics import Interval, TaskResult
from pipeline.eval.selection import MAJORITY_SPLIT


def format_table(results: Sequence[TaskResult]) -> str:
    """One row per task, columns padded to their widest cell, and notes on what a row's marks mean."""
    rows = [("task", "n", "FreeLM acc [95% CI]", "LM-only [95% CI]", "majority [95% CI]", "majority class (from)",
             "positive", "F1", "MCC")]
    for r in results:
        flag = "" if r.majority_from == MAJORITY_SPLIT else "*"
        rows.append((r.task, str(r.n) if r.seed is None else f"{r.n}/{r.of}", _with_ci(r.accuracy, r.accuracy_ci),
                     _with_ci(r.lm_only, r.lm_only_ci), _with_ci(r.majority, r.majority_ci),
                     f"{r.majority_label} ({r.majority_from}){flag}", r.positive or "-", _number(r.f1), _number(r.mcc)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 7, 8}  # n, F1, MCC
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append("[low, high]: 95% Wilson score interval. majority: the majority class's share of the evaluated "
                 "examples. F1: of the positive class.")
    seeds = sorted({r.seed for r in results if r.seed is not None})
    if seeds:
        lines.append(f"n/of: a random sample of the split's examples (--limit), seed {', '.join(map(str, seeds))}")
    if any(r.majority_from != MAJORITY_SPLIT for r in results):
        lines.append(f"*: no {MAJORITY_SPLIT} split; the majority class of the evaluated split itself (an optimistic "
                     "baseline)")
    return "\n".join(lines)


def _with_ci(value: float, ci: Interval) -> str:
    return f"{value:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_dict(checkpoint: str | Path, split: str, results: Sequence[TaskResult], ppl: float | None) -> dict:
    return {"checkpoint": str(checkpoint), "split": split, "tasks": [asdict(r) for r in results], "perplexity": ppl}


def write_json(path: str | Path, checkpoint: str | Path, split: str, results: Sequence[TaskResult],
               ppl: float | None) -> None:
    Path(path).write_text(json.dumps(report_dict(checkpoint, split, results, ppl), indent=2) + "\n")


def log_to_mlflow(run_dir: str | Path, split: str, results: Sequence[TaskResult], ppl: float | None) -> str:
    """Add the results to the training run's MLflow run (from run_dir/mlflow_run.json) at the checkpoint's
    step: metrics `zeroshot/<split>/<task>/...` and `perplexity/<split>` (named to sort after the loss
    charts), and the table (with intervals) and its JSON as artifacts `eval/<split>_step_<N>.{txt,json}`.
    Returns the run id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint.io import latest_tag

    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    tag = latest_tag(run_dir / "checkpoints")
    step = int(tag.split("_")[-1])
    now = int(time.time() * 1000)
    values = {f"perplexity/{split}": ppl} if ppl is not None else {}
    for r in results:
        names = ("accuracy", "lm_only", "majority", "f1", "mcc")
        values.update({f"zeroshot/{split}/{r.task}/{key}": getattr(r, key) for key in names
                       if getattr(r, key) is not None})
    client = MlflowClient(saved["tracking_uri"])
    client.log_batch(saved["run_id"], metrics=[Metric(key, float(value), now, step) for key, value in values.items()])
    stem = f"eval/{split}_{tag}"
    client.log_text(saved["run_id"], format_table(results) + "\n", f"{stem}.txt")
    client.log_dict(saved["run_id"], report_dict(run_dir, split, results, ppl), f"{stem}.json")
    return saved["run_id"]
