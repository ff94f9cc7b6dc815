"""The FreeLM replication at CPU scale: does the teacher signal buy zero-shot GLUE accuracy over a plain LM?

Compared, both from recipes/replication.yaml (one ~18M-parameter GPT-2 block, fp32 ZeRO-3, same seed and LR
schedule):
  freelm   language signal on 13 Project Gutenberg books + teacher signal on the GLUE train splits of SST-2,
           CoLA, MRPC and RTE, interactive 1:1 schedule (the paper's);
  lm_only  the language signal alone on the same books (train.teacher_steps=0).
Same compute rule: lm_only gets the SAME number of optimizer steps as freelm, all of them language steps, so it
sees at least as much compute (a language step is 4,096 tokens, a teacher step 32 propositions of ~39 tokens).
Both are then scored zero-shot on the GLUE dev sets (1k examples of each, the full set where smaller; the
paper's protocol) by `freelm eval`: FreeLM by its teacher head, and both by LM likelihood of each candidate's
proposition (the GPT-3 way; lm_only's teacher head is untrained), with perplexity on a held-out book.

Usage: python benchmarks/replication.py [--out runs/replication] [--steps N] [--limit 1000]
Writes OUT/replication.json and each phase's full log in OUT/*.log; data prep in OUT/data is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.parallel.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "replication.yaml"
BOOKS = REPO.parent / "shared" / "data" / "lm" / "gutenberg_nltk"
HELDOUT = BOOKS / "austen-persuasion.txt"  # never seen by the tokenizer or either model
TASKS = "sst2,cola,mrpc,rte"
# 2 processes x 1 thread (DP=2, ZeRO-3) measured faster than 1 process x 2 threads here (see the report).
NPROCS, THREADS = 2, 1


def run(cmd: list[str], log: Path, show: re.Pattern | None = None, threads: int = 2) -> str:
    """Run a CLI command, streaming the lines matching `show` (all if None); the full output goes to `log`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads)}
    lines = []
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if show is None or show.search(line):
                print("   ", line.rstrip()[-160:], flush=True)
    log.write_text("".join(lines))
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(lines[-40:])}")
    return "".join(lines)


def freelm(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def prepare(data: Path, out: Path) -> None:
    """Tokenizer and corpus from the training books only; GLUE train propositions. Skipped when present."""
    books = sorted(str(p) for p in BOOKS.glob("*.txt") if p != HELDOUT)
    steps = [
        (data / "tok", ["tokenizer", "train", "--input", *books, "--vocab-size", "8000", "--out", str(data / "tok")]),
        (data / "lm" / "gutenberg.idx", ["data", "corpus", "--input", *books, "--tokenizer", str(data / "tok"),
                                         "--out", str(data / "lm" / "gutenberg"), "--workers", "2"]),
        (data / "teacher" / "train.idx", ["data", "tasks", "--config", "recipes/tasks.yaml", "--split", "train",
                                          "--only", TASKS, "--tokenizer", str(data / "tok"),
                                          "--out", str(data / "teacher"), "--max-len", "128"]),
    ]
    for output, args in steps:
        if output.exists():
            print(f"    {output} present, reused")
        else:
            run(freelm(*args), out / f"prep_{args[1]}.log", re.compile(r"tokens in|tokenizer:|^\w+ +\d"))
    print(f"    {len(books)} training books; held out: {HELDOUT.name}")


def train(name: str, out: Path, data: Path, steps: int | None, extra: list[str]) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
    overrides = [f"train.run_dir={run_dir}", f"data.tokenizer={data / 'tok'}", f"data.corpora=[{data / 'lm' / 'gutenberg'}]",
                 f"data.teacher={data / 'teacher' / 'train'}", *([f"train.steps={steps}"] if steps else []), *extra]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(NPROCS), "--master_port", str(free_port()),
                "--module", "pipeline.cli", "train", "--config", str(RECIPE), *overrides]
    log = run(launcher, out / f"train_{name}.log", re.compile(r"freelm\.train: (step|grid|model|schedule|checkpoint)"), THREADS)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    language = [r["loss/language"] for r in rows if "loss/language" in r]
    teacher = [r for r in rows if "loss/teacher" in r]
    t = cfg["train"]
    dp = NPROCS * t["grad_accum"]
    props = len(np.load(data / "teacher" / "train.meta.npy", mmap_mode="r"))  # the .bin holds uint16 ids (vocab 8000)
    mean_prop = (data / "teacher" / "train.bin").stat().st_size / 2 / props
    return {
        "params": int(re.search(r"model: ([\d,]+) params", log).group(1).replace(",", "")),
        "steps": len(rows), "language_steps": len(language), "teacher_steps": len(teacher),
        "language_tokens": len(language) * dp * t["micro_batch"] * cfg["data"]["seq_len"],
        "teacher_propositions": len(teacher) * dp * t["teacher_micro_batch"],
        "teacher_tokens_approx": round(len(teacher) * dp * t["teacher_micro_batch"] * mean_prop),
        "final_language_loss": sum(language[-10:]) / max(len(language[-10:]), 1),
        "final_teacher_accuracy": sum(r["teacher/accuracy"] for r in teacher[-10:]) / max(len(teacher[-10:]), 1)
        if teacher else None,
    }


def evaluate(name: str, out: Path, limit: int) -> dict:
    report = out / f"eval_{name}.json"
    print("    scoring both candidates of each example, teacher head and LM likelihood (silent for minutes)", flush=True)
    run(freelm("eval", "--checkpoint", str(out / name), "--tasks", "recipes/tasks.yaml", "--split", "dev",
               "--only", TASKS, "--limit", str(limit), "--heldout", str(HELDOUT), "--json", str(report)),
        out / f"eval_{name}.log", re.compile(r"^(task|\w+ +\d|perplexity)"))
    return json.loads(report.read_text())


def table(results: dict) -> str:
    free, base = ({r["task"]: r for r in results[m]["eval"]["tasks"]} for m in ("freelm", "lm_only"))
    lines = [f"{'task':<6}{'n':>6}{'majority':>10}{'FreeLM teacher head':>26}{'FreeLM LM-lik.':>16}{'LM-only LM-lik.':>17}"]
    for task, r in free.items():
        head = f"acc {r['accuracy']:.3f}" + {"mrpc": f" F1 {r['f1']:.3f}", "cola": f" MCC {r['mcc']:+.3f}"}.get(task, "")
        lines.append(f"{task:<6}{r['n']:>6}{r['majority']:>10.3f}{head:>26}"
                     f"{r['lm_only']:>16.3f}{base[task]['lm_only']:>17.3f}")
    ppl = {m: results[m]["eval"]["perplexity"] for m in ("freelm", "lm_only")}
    lines.append(f"perplexity on held-out {HELDOUT.name}: FreeLM {ppl['freelm']:.2f}, LM-only {ppl['lm_only']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "replication")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the recipe's)")
    parser.add_argument("--limit", type=int, default=1000, help="dev examples per task (the paper: 1000)")
    args = parser.parse_args()
    out, data = args.out.resolve(), args.out.resolve() / "data"
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    load: dict[str, float] = {"start": os.getloadavg()[0]}  # 1-minute load average; > 2 means a shared machine
    results: dict[str, dict] = {}
    start = time.perf_counter()

    def phase(name: str, fn: Callable[..., Any], *a: Any) -> Any:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        value = fn(*a)
        phases[name], load[name] = round(time.perf_counter() - t0, 1), os.getloadavg()[0]
        print(f"   {name}: {phases[name]:.0f}s (load average {load[name]:.2f})", flush=True)
        return value

    phase("prepare data", prepare, data, out)
    for name, extra in (("freelm", []), ("lm_only", ["train.teacher_steps=0"])):
        results[name] = {"train": phase(f"train {name}", train, name, out, data, args.steps, extra)}
    for name in results:
        results[name]["eval"] = phase(f"eval {name}", evaluate, name, out, args.limit)
    total = time.perf_counter() - start

    f, b = results["freelm"]["train"], results["lm_only"]["train"]
    print(f"\n== results (GLUE dev, zero-shot, at most {args.limit} examples per task)")
    print(table(results))
    print(f"\nmodel: {f['params']:,} params; {NPROCS} processes x {THREADS} thread, ZeRO-3 fp32")
    print(f"FreeLM : {f['steps']} steps = {f['language_steps']} language ({f['language_tokens']:,} tokens) + "
          f"{f['teacher_steps']} teacher ({f['teacher_propositions']:,} propositions, ~{f['teacher_tokens_approx']:,} tokens)")
    print(f"LM-only: {b['steps']} steps, all language ({b['language_tokens']:,} tokens): the same optimizer steps, "
          f"at least FreeLM's compute")
    print(f"final train language loss: FreeLM {f['final_language_loss']:.3f}, LM-only {b['final_language_loss']:.3f}")
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in phases.items()) + f"; total {total:.0f}s")
    print("1-minute load average at start and after each phase: " + ", ".join(f"{v:.2f}" for v in load.values()))
    report = {"recipe": str(RECIPE.relative_to(REPO)), "heldout": HELDOUT.name, "tasks": TASKS.split(","),
              "limit": args.limit, "launcher": f"{NPROCS} processes x {THREADS} threads", "models": results,
              "phases_s": phases, "total_s": round(total, 1), "load_average_1min": load}
    (out / "replication.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out / 'replication.json'}")


if __name__ == "__main__":
    main()
