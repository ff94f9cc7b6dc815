"""Zero-shot evaluation of trained checkpoints: per-task results with baselines, any TP degree, one process or
a TP x DP grid of them, and the tail-only LM scoring against the full-logits definition."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from distributed import free_port, run_ranks
from test_train import REPO, overrides, train_rank

HELDOUT = SHARED_DATA / "lm" / "wikitext-2-tokenized" / "valid.txt"
TASK_ARGS = ("--only", "sst2,cola,mnli", "--limit", "40")
GRID_ARGS = (*TASK_ARGS, "--heldout", str(HELDOUT), "--batch-tokens", "512")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> Path:
    """The same 6 training steps at TP=1 (one process) and TP=2 (two processes)."""
    root = tmp_path_factory.mktemp("runs")
    run_ranks(train_rank, 1, overrides(data, root / "tp1", **{"train.steps": 6}))
    run_ranks(train_rank, 2, overrides(data, root / "tp2", **{"train.steps": 6, "parallel.tensor_parallel": 2}))
    return root


def freelm_eval(run_dir: Path, out: Path, *extra: str, nprocs: int = 1) -> dict:
    """`freelm eval` as users start it: plain (one process) or under torchrun."""
    command = [sys.executable, "-m", "pipeline.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if nprocs > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_port",
                        str(free_port()), "-m"]
    else:
        env["MASTER_PORT"] = str(free_port())
    out_run = subprocess.run([*command, "eval", "--checkpoint", str(run_dir), "--tasks", str(REPO / "recipes" / "tasks.yaml"),
                              "--split", "dev", "--json", str(out), *extra],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out_run.returncode == 0, out_run.stdout[-3000:] + out_run.stderr[-3000:]
    return {**json.loads(out.read_text()), "stdout": out_run.stdout, "stderr": out_run.stderr}


def test_eval_reports_tasks_with_baselines(runs, tmp_path):
    one = freelm_eval(runs / "tp1", tmp_path / "tp1.json", *TASK_ARGS, "--mlflow", "--heldout", str(HELDOUT))
    tasks = {row["task"]: row for row in one["tasks"]}
    assert list(tasks) == ["sst2", "cola", "mnli"] and all(row["n"] == 40 for row in tasks.values())
    for row in tasks.values():
        assert all(0.0 <= row[key] <= 1.0 for key in ("accuracy", "majority", "lm_only"))
    assert tasks["cola"]["f1"] is not None and tasks["cola"]["mcc"] is not None and tasks["mnli"]["f1"] is None
    assert tasks["sst2"]["majority"] >= 0.5 and tasks["mnli"]["majority"] >= 1 / 3
    assert 1.0 < one["perplexity"] < 2000 and math.isfinite(one["perplexity"])
    assert "world 1 = TP 1 x DP 1 (checkpoint TP 1); cpu, float32" in one["stdout"]
    from mlflow.tracking import MlflowClient

    saved = json.loads((runs / "tp1" / "mlflow_run.json").read_text())
    logged = MlflowClient(saved["tracking_uri"]).get_run(saved["run_id"]).data.metrics
    assert logged["eval/dev/cola/accuracy"] == tasks["cola"]["accuracy"] and "eval/dev/perplexity" in logged


@pytest.fixture(scope="module")
def tp2_one(runs, tmp_path_factory) -> dict:
    """The TP=2 checkpoint consolidated and scored in one process: the reference for the grids."""
    return freelm_eval(runs / "tp2", tmp_path_factory.mktemp("one") / "one.json", *GRID_ARGS)


def assert_same_numbers(grid: dict, one: dict) -> None:
    keys = ("task", "n", "accuracy", "lm_only", "majority", "f1", "mcc")
    assert [[row[k] for k in keys] for row in grid["tasks"]] == [[row[k] for k in keys] for row in one["tasks"]]
    assert grid["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_tp2_x_dp2_grid_gives_the_one_process_numbers(runs, tp2_one, tmp_path):
    """A TP=2 checkpoint on 4 gloo ranks under torchrun (each loads its TP shard; batches dealt over 2 DP
    ranks) against the same checkpoint consolidated in one process, and against the TP=1 run of the same
    training."""
    grid = freelm_eval(runs / "tp2", tmp_path / "grid.json", *GRID_ARGS, nprocs=4)
    assert "world 4 = TP 2 x DP 2 (checkpoint TP 2)" in grid["stdout"]
    assert "world 1 = TP 1 x DP 1 (checkpoint TP 2)" in tp2_one["stdout"]
    assert grid["stdout"].count("FreeLM acc") == 1  # only rank 0 reports
    assert_same_numbers(grid, tp2_one)
    tp1 = freelm_eval(runs / "tp1", tmp_path / "tp1.json", *TASK_ARGS)
    assert [(r["task"], r["accuracy"], r["lm_only"]) for r in grid["tasks"]] == [
        (r["task"], r["accuracy"], r["lm_only"]) for r in tp1["tasks"]]


def test_sbatch_eval_runs_the_grid_over_its_tasks(cluster, runs, tp2_one, tmp_path):
    """`sbatch slurm/eval.sh` with 2 tasks: srun starts TP=2 x DP=1 over them; rank 0 writes the JSON."""
    resources = ["--chdir", str(REPO), "--output", str(tmp_path / "eval-%j.log"), "--partition", "debug",
                 "--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
                 "--time", "10:00"]
    job = cluster.sbatch(REPO / "slurm" / "eval.sh", *resources, script_args=[str(runs / "tp2"), *GRID_ARGS],
                         wait=True, timeout=600)
    log = (tmp_path / f"eval-{job}.log").read_text()
    assert cluster.job_state(job) == "COMPLETED", log[-3000:]
    assert "world 2 = TP 2 x DP 1 (checkpoint TP 2)" in log and log.count("FreeLM acc") == 1
    assert_same_numbers(json.loads((runs / "tp2" / f"eval-{job}.json").read_text()), tp2_one)


def test_batches_follow_the_token_budget_and_the_grid_follows_the_checkpoint():
    from pipeline.eval.run import grid_tp
    from pipeline.eval.scoring import Batching, plan_batches

    lengths = [3, 9, 5, 9, 2, 20, 4]
    batches = plan_batches(lengths, Batching(tokens=20))
    assert [b.tolist() for b in batches] == [[5], [1, 3], [2, 6, 0, 4]]  # longest first, stable, <= 20 padded
    assert [b.tolist() for b in plan_batches(lengths, Batching(tokens=100, rows=3))] == [[5, 1, 3], [2, 6, 0], [4]]
    assert [grid_tp(world, 2) for world in (1, 2, 3, 4, 6)] == [1, 2, 1, 2, 2]
    assert grid_tp(4, 1) == 1


def reference_scores(model, tokenizer, props, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The definitions on full logits, one proposition at a time: the teacher's P(true) on
    "<input> [sep] <proposition> [cls]"; mean log-prob of " <proposition>" after the input (cut to
    max_len + 1) minus the same after a bare eos, from the full model's per-position losses."""
    from pipeline.data.propositions import encode_with_tail, proposition_tail

    def tail_mean(ids: np.ndarray, tail: int) -> float:
        tokens = torch.as_tensor(ids)[None]
        loss = model(tokens[:, :-1], signal="language", targets=tokens[:, 1:]).token_loss[0]
        return -loss[len(ids) - tail - 1:].mean().item()

    p_true, lm = [], []
    with torch.no_grad():
        for p in props:
            [(ids, _, _)] = encode_with_tail(tokenizer, [p.input_text], [proposition_tail(p.proposition_text)], max_len)
            p_true.append(model(torch.as_tensor(ids)[None], signal="teacher", lengths=torch.tensor([len(ids)])).p_true.item())
            [(ids, tail, _)] = encode_with_tail(tokenizer, [p.input_text], [" " + p.proposition_text], max_len + 1)
            alone = tokenizer.encode(" " + p.proposition_text)
            lm.append(tail_mean(ids, tail) - tail_mean(np.asarray([tokenizer.special.eos, *alone]), len(alone)))
    return np.array(p_true), np.array(lm)


def test_tail_only_scoring_equals_the_full_logits_definition(data, parallel_1):
    """A small random-weights model (vocab 1000, padded to 1024) on CPU: batched tail-only scores equal the
    one-at-a-time full-logits definitions, and so does the perplexity of held-out windows."""
    from pipeline.data.tasks import SplitStats, iter_propositions, load_tasks
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.eval.run import examples
    from pipeline.eval.scoring import Batching, Placement, perplexity, score_propositions
    from pipeline.model.config import ModelConfig
    from pipeline.model.freelm import FreeLM

    torch.manual_seed(0)
    model = FreeLM(ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=1000, max_seq_len=64)).eval()
    tokenizer = load_tokenizer(data / "tok")
    specs = load_tasks(REPO / "recipes" / "tasks.yaml", ["rte", "mnli"])
    props = [p for spec in specs.values()
             for group in examples(iter_propositions(spec, "dev", SplitStats(), all_candidates=True), 6) for p in group]
    placement = Placement(torch.device("cpu"), progress=False)
    p_true, lm = score_propositions(model, tokenizer, props, 48, placement, Batching(tokens=400))
    ref_p, ref_lm = reference_scores(model, tokenizer, props, 48)
    assert len(props) == 6 * 2 + 6 * 3 and any(len(tokenizer.encode(p.input_text)) > 48 for p in props)  # some cut
    np.testing.assert_allclose(p_true, ref_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lm, ref_lm, rtol=1e-5, atol=1e-5)
    ids = np.asarray(tokenizer.encode(HELDOUT.read_text(encoding="utf-8")[:20000]))
    with torch.no_grad():
        windows = torch.as_tensor(ids[: 8 * 32 + 1])
        full = model(windows[:-1].view(8, 32), signal="language", targets=windows[1:].view(8, 32)).token_loss
    assert perplexity(model, ids, 32, placement, Batching(tokens=100), max_windows=8) == pytest.approx(
        math.exp(full.mean().item()), rel=1e-5)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_data_error(parallel_1, tmp_path):
    from pipeline.errors import DataError
    from pipeline.eval.load import place_parameters
    from pipeline.model.config import ModelConfig
    from pipeline.model.freelm import FreeLM

    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=200, max_seq_len=16)
    full = dict(FreeLM(cfg).named_parameters())
    with torch.device("meta"):
        model = FreeLM(cfg)
    with pytest.raises(DataError, match=r"step_9: 'blocks.0.mlp.fc.weight' has shape \(64, 32\), the model expects \(128, 32\)"):
        place_parameters(model, {**full, "blocks.0.mlp.fc.weight": torch.zeros(64, 32)}, torch.device("cpu"),
                         torch.float32, tmp_path / "step_9")
    with torch.device("meta"):
        model = FreeLM(cfg)
    with pytest.raises(DataError, match="step_9: no tensor 'norm.weight' in the checkpoint"):
        place_parameters(model, {k: v for k, v in full.items() if k != "norm.weight"}, torch.device("cpu"),
                         torch.float32, tmp_path / "step_9")
    with torch.device("meta"):
        model = FreeLM(cfg)
    place_parameters(model, dict(full), torch.device("cpu"), torch.float32, tmp_path / "step_9")
    assert model.lm_head.weight is model.embed.weight and model.blocks[0].attn.qkv.weight.tensor_model_parallel
    assert torch.equal(model.embed.weight, full["embed.weight"])
