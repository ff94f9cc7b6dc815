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
    """A 40-example seeded sample per task; each baseline and interval recomputed from the same selection."""
    from dataclasses import asdict

    from pipeline.data.tasks import load_tasks
    from pipeline.eval.metrics import wilson

    one = freelm_eval(runs / "tp1", tmp_path / "tp1.json", *TASK_ARGS, "--mlflow", "--heldout", str(HELDOUT))
    tasks = {row["task"]: row for row in one["tasks"]}
    assert list(tasks) == ["sst2", "cola", "mnli"]
    assert [(r["n"], r["of"], r["seed"]) for r in tasks.values()] == [(40, 872, 0), (40, 1043, 0), (40, 9815, 0)]
    assert [(r["majority_label"], r["majority_from"], r["positive"]) for r in tasks.values()] == [
        ("positive", "train", "positive"), ("acceptable", "train", "acceptable"), ("entailment", "dev", None)]
    assert tasks["mnli"]["f1"] is None and tasks["mnli"]["mcc"] is None
    specs = load_tasks(REPO / "recipes" / "tasks.yaml", list(tasks))
    for name, row in tasks.items():
        spec = specs[name]
        base = sum(group[0].gold == row["majority_label"] for group in chosen(spec, 40, 0).groups)
        assert row["majority"] == base / 40 and row["majority_ci"] == asdict(wilson(base, 40))
        for key in ("accuracy", "lm_only"):
            assert row[f"{key}_ci"] == asdict(wilson(round(row[key] * 40), 40))
        assert (row["f1"] is None) == (row["mcc"] is None) == (spec.positive is None)
    assert "n/of: a random sample of the split's examples (--limit), seed 0" in one["stdout"]
    assert "*: no train split" in one["stdout"] and "entailment (dev)*" in one["stdout"]
    assert 1.0 < one["perplexity"] < 2000 and math.isfinite(one["perplexity"])
    assert "world 1 = TP 1 x DP 1 (checkpoint TP 1); cpu, float32" in one["stdout"]
    from mlflow.tracking import MlflowClient

    saved = json.loads((runs / "tp1" / "mlflow_run.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    logged = client.get_run(saved["run_id"]).data.metrics
    assert logged["zeroshot/dev/cola/accuracy"] == tasks["cola"]["accuracy"]
    assert logged["zeroshot/dev/sst2/majority"] == tasks["sst2"]["majority"]
    assert logged["perplexity/dev"] == pytest.approx(one["perplexity"]) and "zeroshot/dev/mnli/f1" not in logged
    stem = f"eval/dev_{(runs / 'tp1' / 'checkpoints' / 'latest').read_text()}"
    table = Path(client.download_artifacts(saved["run_id"], f"{stem}.txt", str(tmp_path)))
    assert table.read_text().splitlines()[1].startswith("sst2") and "[95% CI]" in table.read_text()
    assert json.loads(Path(client.download_artifacts(saved["run_id"], f"{stem}.json", str(tmp_path))).read_text())[
        "tasks"] == one["tasks"]


@pytest.fixture(scope="module")
def tp2_one(runs, tmp_path_factory) -> dict:
    """The TP=2 checkpoint consolidated and scored in one process: the reference for the grids."""
    return freelm_eval(runs / "tp2", tmp_path_factory.mktemp("one") / "one.json", *GRID_ARGS)


def assert_same_numbers(grid: dict, one: dict) -> None:
    """Every task's row alike: the same sample on every rank, the same scores."""
    assert grid["tasks"] == one["tasks"]
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


def test_a_packed_group_reads_each_item_where_it_would_alone():
    from pipeline.eval.scoring import Group, Item, attention_inputs, pack

    teacher, lm = Item(np.array([7, 8, 3, 4])), Item(np.array([7, 8, 5]), start=1, targets=np.array([5, 6]))
    row = pack(Group((teacher, lm), shared=2))
    assert row.tokens.tolist() == [7, 8, 3, 4, 5] and row.positions.tolist() == [0, 1, 2, 3, 2]
    assert row.segments.tolist() == [0, 0, 1, 1, 2] and [r.tolist() for r in row.reads] == [[3], [1, 4]]
    positions, mask = attention_inputs([row, pack(Group.alone(Item(np.array([9, 9]))))], 5)
    assert positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                         [1, 1, 0, 0, 1]]
    assert torch.equal(mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())  # a lone item: causal, pads too
    with pytest.raises(ValueError, match="item 1 of a group does not start with the group's 2 shared tokens"):
        pack(Group((teacher, Item(np.array([7, 9, 1]))), shared=2))


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_packed_rows_score_as_their_items_alone(parallel_1, block):
    """Groups of teacher and LM items after shared prefixes, batched with lone items under one budget, give
    the values each item gets in a batch of its own."""
    from pipeline.eval.scoring import Batching, Group, Item, Placement, score_items
    from pipeline.model.config import ModelConfig
    from pipeline.model.freelm import FreeLM

    torch.manual_seed(0)
    model = FreeLM(ModelConfig(block=block, n_layers=2, d_model=32, n_heads=4, vocab_size=100, max_seq_len=32)).eval()
    rng = np.random.default_rng(0)
    groups = []
    for shared in (9, 3, 1, 12):
        prefix = rng.integers(1, 100, shared)
        items = []
        for own in rng.integers(1, 7, 4):
            ids = np.concatenate([prefix, rng.integers(1, 100, own)])
            items.append(Item(ids) if own % 2 else Item(ids[:-1], start=shared - 1, targets=ids[shared:]))
        groups.append(Group(tuple(items), shared))
    groups.append(Group.alone(Item(rng.integers(1, 100, 20), start=4, targets=rng.integers(1, 100, 15))))
    placement = Placement(torch.device("cpu"), progress=False)
    packed = score_items(model, groups, 0, placement, Batching(tokens=10_000))
    alone = score_items(model, [Group.alone(item) for g in groups for item in g.items], 0, placement,
                        Batching(tokens=1))
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-6)


def reference_scores(model, tokenizer, props, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The definitions on full logits, one proposition at a time: the teacher's P(true) on
    "<input> [sep] <proposition> [cls]"; mean log-prob of " <proposition>" after the input minus the same after
    a bare eos, from the full model's per-position losses. An input is cut from its end so that the longest of
    its candidates fits (a teacher item in max_len tokens, an LM item in max_len + 1)."""
    from pipeline.data.propositions import proposition_tail

    def tail_mean(ids: list[int], tail: int) -> float:
        tokens = torch.as_tensor(ids)[None]
        loss = model(tokens[:, :-1], signal="language", targets=tokens[:, 1:]).token_loss[0]
        return -loss[len(ids) - tail - 1:].mean().item()

    def tails(p) -> tuple[list[int], list[int]]:
        return tokenizer.encode(proposition_tail(p.proposition_text)), tokenizer.encode(" " + p.proposition_text)

    room = {}
    for p in props:
        teacher, lm = tails(p)
        room[p.input_text] = min(room.get(p.input_text, max_len), max_len - len(teacher), max_len + 1 - len(lm))
    p_true, lm_scores = [], []
    with torch.no_grad():
        for p in props:
            head, (teacher, lm) = tokenizer.encode(p.input_text)[: room[p.input_text]], tails(p)
            ids = torch.as_tensor(head + teacher)[None]
            p_true.append(model(ids, signal="teacher", lengths=torch.tensor([ids.shape[1]])).p_true.item())
            lm_scores.append(tail_mean(head + lm, len(lm)) - tail_mean([tokenizer.special.eos, *lm], len(lm)))
    return np.array(p_true), np.array(lm_scores)


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_tail_only_scoring_equals_the_full_logits_definition(data, parallel_1, block):
    """A small random-weights model (vocab 1000, padded to 1024) on CPU, learned positions and RoPE: packed,
    batched tail-only scores (an example's candidates in one row after their input) equal the one-at-a-time
    full-logits definitions, and so does the perplexity of held-out windows."""
    from pipeline.data.tasks import SplitStats, iter_propositions, load_tasks
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.eval.run import examples
    from pipeline.eval.scoring import Batching, Placement, perplexity, score_propositions
    from pipeline.model.config import ModelConfig
    from pipeline.model.freelm import FreeLM

    torch.manual_seed(0)
    model = FreeLM(ModelConfig(block=block, n_layers=2, d_model=64, n_heads=4, vocab_size=1000, max_seq_len=64)).eval()
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


TOY_YAML = """\
data_root: .
tasks:
  toy:
    format: tsv
    files: {train: train.tsv, dev: dev.tsv}
    fields: [text, label]
    input: "{text}"
    label: label
    labels: {"0": "no", "1": "yes"}
    positive: "no"
    propositions: {"no": "Here, no.", "yes": "Here, yes."}
  dev_only:
    format: tsv
    files: {dev: dev.tsv}
    fields: [text, label]
    input: "{text}"
    label: label
    labels: {"0": "no", "1": "yes"}
    propositions: {"no": "Here, no.", "yes": "Here, yes."}
"""


def toy_tasks(root: Path, train: str, dev: str) -> dict:
    """The two TOY_YAML tasks over TSV files whose labels are the characters of `train` and `dev`."""
    from pipeline.data.tasks import load_tasks

    for name, labels in (("train", train), ("dev", dev)):
        rows = "".join(f"example {i}\t{label}\n" for i, label in enumerate(labels))
        (root / f"{name}.tsv").write_text(f"text\tlabel\n{rows}")
    (root / "tasks.yaml").write_text(TOY_YAML)
    return load_tasks(root / "tasks.yaml")


def chosen(spec, limit: int | None, seed: int):
    """What `freelm eval --limit limit --seed seed` evaluates of the task's dev split."""
    from pipeline.data.tasks import SplitStats, iter_propositions
    from pipeline.eval.run import examples
    from pipeline.eval.selection import select

    return select(spec, "dev", examples(iter_propositions(spec, "dev", SplitStats(), all_candidates=True)), limit, seed)


def test_wilson_interval_and_f1_mcc_against_hand_computed_values():
    """Wilson, z = 1.96: 8/10 -> centre (0.8 + 0.19208) / 1.38415 = 0.71674, half 1.96 * sqrt(0.016 + 0.009604)
    / 1.38415 = 0.22658; 0/5 -> centre = half = 0.38415 / 1.76829 = 0.21724. F1 and MCC of a 10-example
    confusion (tp 2, fn 1, fp 1, tn 6 for class 1): F1 4/6 of class 1, 12/14 of class 0; MCC 11/21 either way."""
    from pipeline.eval.metrics import Interval, binary_f1_mcc, wilson

    assert wilson(8, 10) == Interval(pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94332, abs=1e-5))
    assert wilson(0, 5) == Interval(0.0, pytest.approx(0.43448, abs=1e-5))
    assert wilson(5, 5) == Interval(pytest.approx(0.56552, abs=1e-5), 1.0)
    with pytest.raises(ValueError):
        wilson(0, 0)
    gold = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    assert binary_f1_mcc(gold, pred, positive=1) == (pytest.approx(4 / 6), pytest.approx(11 / 21))
    assert binary_f1_mcc(gold, pred, positive=0) == (pytest.approx(12 / 14), pytest.approx(11 / 21))
    assert binary_f1_mcc(gold, np.zeros(10, dtype=int), positive=1) == (0.0, 0.0)  # MCC undefined: 0


def test_positive_class_is_declared_or_defaulted_and_checked(tmp_path):
    """recipes/tasks.yaml names each two-label task's positive class; undeclared, it is the label of raw value
    "1", else the second declared, or a threshold's at_or_above; a wrong declaration is a ConfigError."""
    from pipeline.data.tasks import load_tasks
    from pipeline.errors import ConfigError

    recipes = {name: spec.positive for name, spec in load_tasks(REPO / "recipes" / "tasks.yaml").items()}
    assert recipes == {"sst2": "positive", "cola": "acceptable", "mrpc": "equivalent", "stsb": "similar",
                       "rte": "entailment", "wnli": "entailment", "mnli": None, "qnli": "entailment",
                       "qqp": "duplicate", "trec": None, "ag_news": None, "movie_reviews": "positive"}
    base = 'format: jsonl, files: {dev: d.jsonl}, fields: [t, s], input: "{t}", label: s'
    decls = {
        "by_value": 'labels: {"1": "yes", "0": "no"}, propositions: {"yes": "Y", "no": "N"}',
        "second": 'labels: {"a": "a", "b": "b"}, propositions: {"a": "A", "b": "B"}',
        "threshold": 'threshold: {value: 1, at_or_above: hi, below: lo}, propositions: {"hi": "H", "lo": "L"}',
        "three": 'labels: {"a": "a", "b": "b", "c": "c"}, propositions: {"a": "A", "b": "B", "c": "C"}',
    }
    (tmp_path / "tasks.yaml").write_text("tasks:\n" + "".join(f"  {k}: {{{base}, {v}}}\n" for k, v in decls.items()))
    assert {k: v.positive for k, v in load_tasks(tmp_path / "tasks.yaml").items()} == {
        "by_value": "yes", "second": "b", "threshold": "hi", "three": None}
    wrong = {decls["second"] + ", positive: c": r"tasks\.t\.positive: 'c' is not a label name; labels: a, b",
             decls["three"] + ", positive: a": r"tasks\.t\.positive: only for tasks with two labels; this one has 3"}
    for decl, error in wrong.items():
        (tmp_path / "tasks.yaml").write_text(f"tasks:\n  t: {{{base}, {decl}}}\n")
        with pytest.raises(ConfigError, match=error):
            load_tasks(tmp_path / "tasks.yaml")


def test_majority_from_train_f1_of_the_declared_positive_and_intervals(tmp_path):
    """Train 6 no / 4 yes, dev 3 no / 7 yes: the baseline answers "no" (train's majority), right on 3/10 of
    dev, not dev's own 7/10; a task without train falls back to dev's majority, flagged. The teacher gets 8/10
    (two "yes" taken for "no"): F1 of the declared positive "no" 6/8 (tp 3, fp 2, fn 0, tn 5), MCC
    15/sqrt(5*3*7*5); the LM-only score always answers "yes": 7/10."""
    from pipeline.eval.metrics import task_result, wilson
    from pipeline.eval.report import format_table, write_json

    specs = toy_tasks(tmp_path, train="0001011010", dev="0001111111")
    pred = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    p_true = np.array([[1.0 - y, float(y)] for y in pred]).ravel()
    lm = np.tile([0.0, 1.0], 10)
    results = [task_result(spec, chosen(spec, None, 0), p_true, lm) for spec in specs.values()]
    toy, dev_only = results
    assert (toy.n, toy.of, toy.seed, toy.positive, toy.majority_label, toy.majority_from) == (
        10, 10, None, "no", "no", "train")
    assert (toy.accuracy, toy.lm_only, toy.majority) == (0.8, 0.7, 0.3)
    assert (toy.accuracy_ci, toy.lm_only_ci, toy.majority_ci) == (wilson(8, 10), wilson(7, 10), wilson(3, 10))
    assert toy.f1 == pytest.approx(6 / 8) and toy.mcc == pytest.approx(15 / math.sqrt(5 * 3 * 7 * 5))
    assert (dev_only.positive, dev_only.majority_label, dev_only.majority_from, dev_only.majority) == (
        "yes", "yes", "dev", 0.7)
    assert dev_only.f1 == pytest.approx(10 / 12)  # the same predictions, F1 of "yes": tp 5, fp 0, fn 2
    table = format_table(results).splitlines()
    assert table[1].split() == ["toy", "10", "0.800", "[0.490,", "0.943]", "0.700", "[0.397,", "0.892]", "0.300",
                                "[0.108,", "0.603]", "no", "(train)", "no", "0.750", "0.655"]
    assert "yes (dev)*" in table[2] and table[-1].startswith("*: no train split") and "seed" not in table[-2]
    write_json(tmp_path / "eval.json", "run", "dev", results, None)
    row = json.loads((tmp_path / "eval.json").read_text())["tasks"][0]
    assert row["majority_ci"] == {"low": wilson(3, 10).low, "high": wilson(3, 10).high}
    assert row["positive"] == "no" and row["majority_from"] == "train"


def test_limit_takes_a_seeded_sample_the_same_in_every_process(tmp_path):
    """On a label-sorted split (50 no, then 50 yes), --limit 10 is not its first 10: the same seed draws the
    same examples (also in another process with another PYTHONHASHSEED), another seed others, in file order;
    the issue's case, 872 of the 2000 movie reviews (sorted neg then pos), has both classes."""
    from pipeline.data.tasks import load_tasks
    from pipeline.eval.selection import sample

    spec = toy_tasks(tmp_path, train="01", dev="0" * 50 + "1" * 50)["toy"]
    ids = {seed: [group[0].example_id for group in chosen(spec, 10, seed).groups] for seed in (0, 1)}
    again = chosen(spec, 10, 0)
    assert [group[0].example_id for group in again.groups] == ids[0] and again.of == 100
    assert again.seed == 0 and ids[0] != ids[1] and ids[0] != list(range(10)) and ids[0] == sorted(ids[0])
    assert {group[0].gold for group in again.groups} == {"no", "yes"}
    assert [(len(c.groups), c.seed) for c in (chosen(spec, 100, 0), chosen(spec, None, 0))] == [(100, None)] * 2
    code = "from pipeline.eval.selection import sample; print(sample(range(100), 10, 0, 'toy/dev'))"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": "123"},
                           capture_output=True, text=True, check=True)
    assert other.stdout.split("\n")[0] == str(ids[0]) == str(sample(range(100), 10, 0, "toy/dev"))
    reviews = chosen(load_tasks(REPO / "recipes" / "tasks.yaml", ["movie_reviews"])["movie_reviews"], 872, 0)
    golds = [group[0].gold for group in reviews.groups]
    assert len(golds) == 872 and min(golds.count("negative"), golds.count("positive")) > 872 * 0.4
