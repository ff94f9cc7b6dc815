"""The paper's path at its real size, as a user runs it: a GPT-2-medium-shaped checkpoint and a GPT-2-style BPE,
`recipes/0.3b.yaml` as shipped (overridden only where a CPU needs it: fp32, a short sequence, micro-batches of
one, the steps; `data.num_workers` stays as shipped) on 2 ranks under the deepspeed launcher, started from that
checkpoint, for a language step; then resumed for a teacher step, evaluated, exported and loaded back in
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

from distributed import free_port, run_ranks
from realsize import prepare_gpt2_data, save_gpt2_medium

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "0.3b.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("realsize")
    prepare_gpt2_data(root, tasks="sst2", max_len=64)
    save_gpt2_medium(root / "gpt2-medium")
    return root


def cpu_overrides(world: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"data.tokenizer={world / 'tok'}", f"data.corpora=[{world / 'lm'}]", f"data.teacher={world / 'teacher' / 'train'}",
        f"train.run_dir={run_dir}", f"train.init_from={world / 'gpt2-medium'}",
        f"train.ds_config={REPO / 'ds_configs' / 'zero3.json'}", "data.seq_len=64", "train.micro_batch=1",
        "train.teacher_micro_batch=2", "train.grad_accum=1", f"train.steps={steps}", "train.warmup_steps=1",
        "train.save_every=1", "train.log_every=1", "train.keep_checkpoints=1",  # 4.3 GB each
    ]


def deepspeed_train(overrides: list[str]) -> str:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "pipeline.cli", "train", "--config", str(RECIPE), *overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def freelm(*args: str) -> str:
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def compare_with_export(run_dir: str, hf_dir: str, out: str) -> None:
    """The export, loaded by stock transformers, against the pipeline's own model of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    from pipeline.eval.load import load_trained
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    init_parallel(1)
    model, tokenizer, cfg = load_trained(run_dir)
    tokens = torch.tensor([tokenizer.encode("It was a truth universally acknowledged [sep] yes [cls]")])
    with torch.no_grad():
        ours = model(tokens).logits[..., : cfg.model.vocab_size]
    del model
    lm = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    with torch.no_grad():
        theirs = lm(tokens).logits
    Path(out).write_text(json.dumps({
        "architecture": type(lm).__name__, "layers": lm.config.n_layer, "vocab": lm.config.vocab_size,
        "max_diff": float((theirs - ours).abs().max()),
    }))
    destroy_parallel()


def test_0_3b_recipe_as_shipped_trains_resumes_evaluates_and_exports(world, tmp_path):
    run_dir = tmp_path / "run"
    log = deepspeed_train(cpu_overrides(world, run_dir, steps=1))  # a language step
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["vocab_size"] == 50260 and config["data"]["num_workers"] == 2
    assert "initialised" in log and (run_dir / "checkpoints" / "step_00000001").is_dir()

    log = deepspeed_train(cpu_overrides(world, run_dir, steps=2))  # the same job again: resumes, a teacher step
    assert "resuming at step 1" in log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and "loss/language" in rows[0] and "loss/teacher" in rows[1]

    report = tmp_path / "eval.json"
    freelm("eval", "--checkpoint", str(run_dir), "--tasks", str(REPO / "recipes" / "tasks.yaml"), "--split", "dev",
           "--only", "sst2", "--limit", "8", "--json", str(report))
    rows = json.loads(report.read_text())["tasks"]
    assert [(row["task"], row["n"]) for row in rows] == [("sst2", 8)]

    freelm("export-hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf"))
    run_ranks(compare_with_export, 1, str(run_dir), str(tmp_path / "hf"), str(tmp_path / "compare.json"))
    compared = json.loads((tmp_path / "compare.json").read_text())
    assert compared["architecture"] == "GPT2LMHeadModel" and compared["layers"] == 24 and compared["vocab"] == 50260
    assert compared["max_diff"] < 1e-3
