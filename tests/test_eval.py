"""Zero-shot evaluation of trained checkpoints: per-task results with baselines, any TP degree."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import SHARED_DATA
from distributed import free_port, run_ranks
from test_train import REPO, data, overrides, train_rank  # noqa: F401  (data: a fixture)


def freelm_eval(run_dir: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--checkpoint", str(run_dir), "--tasks",
                    str(REPO / "recipes" / "tasks.yaml"), "--split", "dev", "--json", str(out), *extra],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_eval_reports_tasks_with_baselines_and_matches_across_tp(data, tmp_path):  # noqa: F811
    steps = {"train.steps": 6}
    run_ranks(train_rank, 1, overrides(data, tmp_path / "tp1", **steps))
    run_ranks(train_rank, 2, overrides(data, tmp_path / "tp2", **steps, **{"parallel.tensor_parallel": 2}))
    args = ("--only", "sst2,cola,mnli", "--limit", "40")
    one = freelm_eval(tmp_path / "tp1", tmp_path / "tp1.json", *args, "--mlflow",
                      "--heldout", str(SHARED_DATA / "lm" / "wikitext-2-tokenized" / "valid.txt"))
    tasks = {row["task"]: row for row in one["tasks"]}
    assert list(tasks) == ["sst2", "cola", "mnli"] and all(row["n"] == 40 for row in tasks.values())
    for row in tasks.values():
        assert all(0.0 <= row[key] <= 1.0 for key in ("accuracy", "majority", "lm_only"))
    assert tasks["cola"]["f1"] is not None and tasks["cola"]["mcc"] is not None and tasks["mnli"]["f1"] is None
    assert tasks["sst2"]["majority"] >= 0.5 and tasks["mnli"]["majority"] >= 1 / 3
    assert 1.0 < one["perplexity"] < 2000 and math.isfinite(one["perplexity"])
    from mlflow.tracking import MlflowClient

    saved = json.loads((tmp_path / "tp1" / "mlflow_run.json").read_text())
    logged = MlflowClient(saved["tracking_uri"]).get_run(saved["run_id"]).data.metrics
    assert logged["eval/dev/cola/accuracy"] == tasks["cola"]["accuracy"] and "eval/dev/perplexity" in logged
    two = freelm_eval(tmp_path / "tp2", tmp_path / "tp2.json", *args)
    assert [(r["task"], r["accuracy"], r["lm_only"]) for r in two["tasks"]] == [
        (r["task"], r["accuracy"], r["lm_only"]) for r in one["tasks"]]
