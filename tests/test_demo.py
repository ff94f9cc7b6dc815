"""`freelm demo --quick`, end to end as a newcomer runs it: generated data, ZeRO-3 on two processes under the
deepspeed launcher, zero-shot table, MLflow run, checkpoint and a Hugging Face export that loads."""

from __future__ import annotations

import json
import subprocess
import sys

from test_train import REPO, metrics


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from pipeline.data.tasks import load_tasks

    tasks = load_tasks(tmp_path / "data" / "tasks.yaml")
    table = out.stdout[out.stdout.index("FreeLM acc"):]
    assert all(f"\n{name} " in table for name in tasks) and "never trained on:" in table
    rows = metrics(tmp_path / "run")
    assert len(rows) == 30 and any("loss/teacher" in row for row in rows)
    assert (tmp_path / "run" / "checkpoints" / "step_00000030").is_dir()

    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    saved = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    logged = MlflowClient(saved["tracking_uri"]).get_run(saved["run_id"]).data.metrics
    assert "loss/language" in logged and all(f"zeroshot/dev/{name}/accuracy" in logged for name in tasks)
    assert f"mlflow ui --backend-store-uri {saved['tracking_uri']}" in out.stdout
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert type(lm).__name__ == "GPT2LMHeadModel"
