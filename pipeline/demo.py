"""`freelm demo`: the whole recipe end to end on a machine with no data and no network.

It generates a synthetic world (a text corpus and proposition tasks, one of them never trained on), trains a
tokenizer, builds both data streams, trains a tiny FreeLM on both signals with DeepSpeed ZeRO-3 on two
processes (started by the `deepspeed` launcher, as on a cluster), scores the dev sets zero-shot, exports the
model to Hugging Face format and says where everything is. A rerun replaces the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step (\d+)/(\d+)")


@dataclass(frozen=True)
class DemoSize:
    corpus_mb: float
    train_examples: int
    dev_examples: int
    steps: int


SIZES = {"full": DemoSize(3.0, 3000, 250, 1000), "quick": DemoSize(0.4, 400, 40, 30)}
STAGES = ("synthetic data", "tokenizer", "language stream", "teacher stream", "training", "zero-shot eval",
          "HF export")


def run_demo(out: str | Path = "runs/demo", size: str = "full", steps: int | None = None, processes: int = 2) -> None:
    out = Path(out).resolve()
    plan = SIZES[size]
    steps = steps or plan.steps
    data, run_dir = out / "data", out / "run"
    for previous in (run_dir, out / "hf"):  # the demo owns `out`: a rerun starts over
        shutil.rmtree(previous, ignore_errors=True)
    bar = tqdm(STAGES, desc="demo", unit="stage", bar_format="{desc} {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")
    started = time.perf_counter()

    def stage(name: str) -> None:
        bar.set_description_str(f"demo: {name:<15}")

    stage("synthetic data")
    from pipeline.data.synthetic import generate

    world = generate(data, corpus_mb=plan.corpus_mb, train_examples=plan.train_examples,
                     dev_examples=plan.dev_examples)
    bar.update()
    stage("tokenizer")
    from pipeline.data.tokenizer import train_sentencepiece

    train_sentencepiece([world.corpus], data / "tok", vocab_size=1000)
    bar.update()
    stage("language stream")
    from pipeline.data.corpus import build_corpus

    build_corpus([str(world.corpus)], data / "tok", data / "lm", workers=processes)
    bar.update()
    stage("teacher stream")
    from pipeline.data.propositions import build_propositions

    build_propositions(world.tasks_yaml, "train", data / "tok", data / "teacher", max_len=64)
    bar.update()
    stage("training")
    train(out, run_dir, data, steps, processes)
    bar.update()
    stage("zero-shot eval")
    table = evaluate(run_dir, world)
    bar.update()
    stage("HF export")
    from pipeline.hf.export import export_hf

    export_hf(run_dir, out / "hf")
    bar.update()
    bar.close()
    report(out, run_dir, table, time.perf_counter() - started)


def train(out: Path, run_dir: Path, data: Path, steps: int, processes: int) -> None:
    """`freelm train` under the deepspeed launcher; the log goes to out/train.log, steps to a progress bar."""
    from pipeline.parallel.distributed import free_port

    overrides = [f"train.run_dir={run_dir}", f"train.steps={steps}", f"data.tokenizer={data / 'tok'}",
                 f"data.corpora=[{data / 'lm'}]", f"data.teacher={data / 'teacher' / 'train'}"]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
               str(free_port()), "--module", "pipeline.cli", "train", "--config", str(REPO / "recipes" / "demo.yaml"),
               *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # a CPU demo
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    log_path = out / "train.log"
    with open(log_path, "w") as log, tqdm(total=steps, desc="training", unit="step", leave=False) as progress:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if match := STEP_LINE.search(line):
                progress.update(int(match.group(1)) - progress.n)
        if proc.wait() != 0:
            tail = log_path.read_text().splitlines()[-30:]
            raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}:\n" + "\n".join(tail))


def evaluate(run_dir: Path, world) -> str:
    """Score every dev task (the unseen one included) and log the results to the run's MLflow run."""
    from pipeline.eval.report import format_table, log_to_mlflow
    from pipeline.eval.run import evaluate_run
    from pipeline.parallel.distributed import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    run = evaluate_run(run_dir, world.tasks_yaml, "dev", heldout=world.heldout)
    log_to_mlflow(run_dir, "dev", run.tasks, run.perplexity)
    unseen = ", ".join(sorted(set(world.task_names) - set(world.trained_tasks)))
    return f"{format_table(run.tasks)}\n(never trained on: {unseen}; held-out perplexity {run.perplexity:.2f})"


def report(out: Path, run_dir: Path, table: str, seconds: float) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def first_last(key: str) -> str:
        values = [row[key] for row in rows if key in row]
        head, tail = values[: max(1, len(values) // 10)], values[-max(1, len(values) // 10):]
        return f"{sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}"

    mlflow = json.loads((run_dir / "mlflow_run.json").read_text())
    checkpoints = run_dir / "checkpoints"
    print(f"\nFreeLM demo finished in {seconds / 60:.1f} min ({len(rows)} steps, first -> last 10%):")
    print(f"  loss/language {first_last('loss/language')}, loss/teacher {first_last('loss/teacher')}, "
          f"teacher/accuracy {first_last('teacher/accuracy')}")
    print("\nZero-shot on the dev splits (teacher-head scoring vs LM likelihood and the majority class):")
    print(table)
    print(f"\n  training log   {out / 'train.log'}")
    print(f"  checkpoint     {checkpoints / (checkpoints / 'latest').read_text().strip()}")
    print(f"  MLflow run     {mlflow['run_id']} in {mlflow['tracking_uri']}")
    print(f"  HF export      {out / 'hf'}  (transformers.AutoModelForCausalLM.from_pretrained, or "
          "pipeline.hf.export.from_pretrained with the teacher head)")
    print(f"\nOpen the MLflow UI:  mlflow ui --backend-store-uri {mlflow['tracking_uri']}")
