"""`freelm demo --quick`, end to end as a newcomer runs it: generated data, ZeRO-3 on two processes under the
deepspeed launcher, zero-shot table and the line saying what it shows, MLflow run, checkpoint and a Hugging Face
export that loads; and that line's wording on results with known verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

from test_train import REPO, metrics

from pipeline.demo import statement
from pipeline.eval.metrics import TaskResult, wilson


def result(task: str, hits: int, lm_hits: int, majority_hits: int, n: int = 100) -> TaskResult:
    return TaskResult(task, n, n, None, hits / n, wilson(hits, n), lm_hits / n, wilson(lm_hits, n),
                      majority_hits / n, wilson(majority_hits, n), "a", "train")


def test_statement_follows_the_numbers():
    trained = ("a", "b")  # a: 95% interval [0.89, 0.98] above both; b: [0.45, 0.64] not above 0.5
    seen = [result("a", 95, 50, 50), result("b", 55, 40, 50)]
    head = ("What this shows: on the trained tasks the teacher head beat LM likelihood and the majority class (its "
            "95% interval above both) on 1 of 2 (a 0.95 vs 0.50 and 0.50, b 0.55 vs 0.40 and 0.50); on c, never "
            "trained on, it scored ")
    tail = (". What it does not: anything about real tasks or models, this is a generated world and a tiny model "
            "(benchmarks/replication.py measures the teacher signal on GLUE).")
    assert statement([*seen, result("c", 70, 52, 50)], trained) == (
        head + "0.70 vs 0.52 and 0.50, above both: it transferred" + tail)
    assert statement([*seen, result("c", 30, 52, 50)], trained) == (
        head + "0.30 vs 0.52 and 0.50, below the better baseline: it did not transfer" + tail)
    assert statement([*seen, result("c", 55, 52, 50)], trained) == (
        head + "0.55 vs 0.52 and 0.50, not clearly apart from the better baseline: no clear transfer" + tail)


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from pipeline.data.tasks import load_tasks

    tasks = load_tasks(tmp_path / "data" / "tasks.yaml")
    table = out.stdout[out.stdout.index("FreeLM acc"):]
    assert all(f"\n{name} " in table for name in tasks) and "never trained on:" in table
    shows = [line for line in out.stdout.splitlines() if line.startswith("What this shows: ")]
    assert len(shows) == 1 and ", never trained on, it scored " in shows[0] and "What it does not: " in shows[0]
    rows = metrics(tmp_path / "run")
    assert len(rows) == 30 and any("loss/teacher" in row for row in rows)
    assert (tmp_path / "run" / "checkpoints" / "step_00000030").is_dir()

    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    saved = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    logged = MlflowClient(saved["tracking_uri"]).get_run(saved["run_id"]).data.metrics
    assert "loss/language" in logged and all(f"zeroshot/dev/{name}/accuracy" in logged for name in tasks)
    assert f"mlflow ui --backend-store-uri {saved['tracking_uri']}" in out.stdout
    link = f"http://127.0.0.1:5000/#/experiments/{saved['experiment_id']}/runs/{saved['run_id']}/model-metrics?"
    assert f"then the run's charts:  {link}workflowType=machine_learning" in out.stdout
    assert "\r" not in out.stdout + out.stderr  # no terminal here: progress as plain lines
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert type(lm).__name__ == "GPT2LMHeadModel"
