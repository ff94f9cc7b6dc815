"""What a user sees of a training run in the MLflow UI, in a real headless browser (Debian's chromium,
installed when missing): the run page's link opens the model-training view on the metrics tab, the loss
section at the top, related keys together, the zero-shot scores after the training curves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from distributed import run_ranks
from mlflow_server import MlflowServer
from test_train import overrides, train_rank

SECTION = re.compile(r'white-space: pre;">([^<]+)</div><div class="[^"]*" style="[^"]*">\((\d+)\)</div>')


def browser() -> str:
    from slurm_cluster import SlurmUnavailable, ensure_installed

    try:
        ensure_installed({"chromium": "chromium"})
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))
    return shutil.which("chromium")


def rendered(chromium: str, url: str) -> str:
    """The page's DOM after its scripts ran (20 s of virtual time)."""
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1400",
                          "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_run_link_opens_the_training_view_with_the_losses_first(data, tmp_path):
    from pipeline.eval.metrics import TaskResult, wilson
    from pipeline.eval.report import log_to_mlflow
    from pipeline.train.run_info import run_link

    chromium = browser()
    run = tmp_path / "ui-run"
    run_ranks(train_rank, 1, overrides(data, run, **{"train.steps": 4, "train.save_every": 4,
                                                      "tracking.enabled": "true"}))
    results = [TaskResult(task, 10, 10, None, 0.8, wilson(8, 10), 0.5, wilson(5, 10), 0.6, wilson(6, 10), "a",
                          "train") for task in ("cola", "sst2")]
    log_to_mlflow(run, "dev", results, 12.5)
    saved = json.loads((run / "mlflow_run.json").read_text())
    server = MlflowServer(run)  # the run's own store: what `mlflow ui --backend-store-uri` on it serves
    server.start()
    try:
        dom = rendered(chromium, run_link(server.uri, saved["experiment_id"], saved["run_id"]))
    finally:
        server.stop()
    assert re.search(r'role="tab" aria-selected="true"[^>]*content-model-metrics', dom)
    sections = [(name, int(n)) for name, n in SECTION.findall(dom) if name != "Model metrics"]  # all charts
    assert sections == [("loss", 2), ("perplexity", 1), ("teacher", 1), ("throughput", 3), ("train", 3),
                        ("zeroshot/dev/cola", 3), ("zeroshot/dev/sst2", 3)]
