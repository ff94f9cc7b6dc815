"""`freelm demo`: the whole recipe end to end on a machine with no data and no network.

It generates a synthetic world (a text corpus and proposition tasks, one of them never trained on), trains a
tokenizer, builds both data streams, trains a tiny FreeLM on both signals with DeepSpeed ZeRO-3 on two
processes (started by the `deepspeed` launcher, as on a cluster), scores the dev sets zero-shot (the teacher head
against LM likelihood and the majority class, with one line saying what these numbers show and what they do not),
exports the model to Hugging Face format and says where everything is. A rerun replaces the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.synthetic import SyntheticData, generate
from pipeline.progress import progress

if TYPE_CHECKING:
    from pipeline.eval.metrics import TaskResult
    from pipeline.eval.run import Evaluation

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"step (\d+)/(\d+)")


@dataclass(frozen=True)
class DemoSize:
    corpus_mb: float
    train_examples: int
    dev_examples: int
    steps: int


SIZES = {"full": DemoSize(3.0, 3000, 250, 1500), "quick": DemoSize(0.4, 400, 40, 30)}
STAGES = ("synthetic data", "tokenizer", "language stream", "teacher stream", "training", "zero-shot eval",
          "HF export")


def run_demo(out: str | Path = "runs/demo", size: str = "full", steps: int | None = None, processes: int = 2) -> None:
    out = Path(out).resolve()
    plan = SIZES[size]
    steps = steps or plan.steps
    data, run_dir = out / "data", out / "run"
    for previous in (run_dir, out / "hf"):  # the demo owns `out`: a rerun starts over
        shutil.rmtree(previous, ignore_errors=True)
    bar = progress(STAGES, desc="demo", unit="stage", bar_format="{desc} {n_fmt}/{total_fmt} stages |{bar}| {elapsed}")
    started = time.perf_counter()

    def stage(name: str) -> None:
        bar.set_description_str(f"demo: {name:<15}")

    stage("synthetic data")
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
    run = evaluate(run_dir, world)
    bar.update()
    stage("HF export")
    from pipeline.hf.export import export_hf

    export_hf(run_dir, out / "hf")
    bar.update()
    bar.close()
    report(out, run_dir, run, world, time.perf_counter() - started)


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
    with open(log_path, "w") as log, progress(total=steps, desc="training", unit="step", leave=False) as bar:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if match := STEP_LINE.search(line):
                bar.update(int(match.group(1)) - bar.n)
        if proc.wait() != 0:
            tail = log_path.read_text().splitlines()[-30:]
            raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}:\n" + "\n".join(tail))


def evaluate(run_dir: Path, world: SyntheticData) -> Evaluation:
    """Score every dev task (the unseen one included) and log the results to the run's MLflow run."""
    from pipeline.eval.report import log_to_mlflow
    from pipeline.eval.run import evaluate_run
    from pipeline.parallel.distributed import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    run = evaluate_run(run_dir, world.tasks_yaml, "dev", heldout=world.heldout)
    log_to_mlflow(run_dir, "dev", run.tasks, run.perplexity)
    return run


def _versus(r: TaskResult) -> str:
    return f"{r.task} {r.accuracy:.2f} vs {r.lm_only:.2f} and {r.majority:.2f}"


def _beats(r: TaskResult) -> bool | None:
    """True: the teacher head's 95% interval lies above both baselines; False: below the better one; None:
    neither."""
    best = max(r.lm_only, r.majority)
    return True if r.accuracy_ci.low > best else False if r.accuracy_ci.high < best else None


def statement(results: Sequence[TaskResult], trained: Sequence[str]) -> str:
    """One line on what the table shows, from its numbers, and what it does not."""
    seen = [r for r in results if r.task in trained]
    unseen = [r for r in results if r.task not in trained]
    wins = sum(_beats(r) is True for r in seen)
    verdict = {True: "above both: it transferred", False: "below the better baseline: it did not transfer",
               None: "not clearly apart from the better baseline: no clear transfer"}
    parts = [f"on the trained tasks the teacher head beat LM likelihood and the majority class (its 95% interval "
             f"above both) on {wins} of {len(seen)} ({', '.join(map(_versus, seen))})"]
    parts += [f"on {r.task}, never trained on, it scored {r.accuracy:.2f} vs {r.lm_only:.2f} and {r.majority:.2f}, "
              f"{verdict[_beats(r)]}" for r in unseen]
    return (f"What this shows: {'; '.join(parts)}. What it does not: anything about real tasks or models, this is a "
            "generated world and a tiny model (benchmarks/replication.py measures the teacher signal on GLUE).")


def report(out: Path, run_dir: Path, run: Evaluation, world: SyntheticData, seconds: float) -> None:
    from pipeline.eval.report import format_table

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def first_last(key: str) -> str:
        values = [row[key] for row in rows if key in row]
        head, tail = values[: max(1, len(values) // 10)], values[-max(1, len(values) // 10):]
        return f"{sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}"

    checkpoints = run_dir / "checkpoints"
    unseen = ", ".join(name for name in world.task_names if name not in world.trained_tasks)
    print(f"\nFreeLM demo finished in {seconds / 60:.1f} min ({len(rows)} steps, first -> last 10%):")
    print(f"  loss/language {first_last('loss/language')}, loss/teacher {first_last('loss/teacher')}, "
          f"teacher/accuracy {first_last('teacher/accuracy')}")
    print("\nZero-shot on the dev splits (teacher-head scoring vs LM likelihood and the majority class):")
    print(format_table(run.tasks))
    print(f"(never trained on: {unseen}; held-out perplexity {run.perplexity:.2f})")
    print(statement(run.tasks, world.trained_tasks))
    print(f"\n  training log   {out / 'train.log'}")
    print(f"  checkpoint     {checkpoints / (checkpoints / 'latest').read_text().strip()}")
    print(f"  HF export      {out / 'hf'}  (transformers.AutoModelForCausalLM.from_pretrained, or "
          "pipeline.hf.export.from_pretrained with the teacher head)")
    print_mlflow(run_dir)


def print_mlflow(run_dir: Path) -> None:
    """Where the run's MLflow run is, the command that serves it (a path relative to the working directory
    when under it, so it also works on the host of a container that mounts it) and the link to its charts."""
    from pipeline.train.run_info import SQLITE, run_link, sqlite_path

    mlflow = json.loads((run_dir / "mlflow_run.json").read_text())
    uri = mlflow["tracking_uri"]
    if (db := sqlite_path(uri)) is not None and db.is_relative_to(Path.cwd()):
        uri = SQLITE + str(db.relative_to(Path.cwd()))
    print(f"  MLflow run     {mlflow['run_id']} in {uri}")
    print(f"\nOpen the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    print(f"then the run's charts:  {run_link('http://127.0.0.1:5000', mlflow['experiment_id'], mlflow['run_id'])}")
