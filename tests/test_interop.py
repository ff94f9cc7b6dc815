"""The FreeLM authors' checkpoint layout, both directions.

The reference is their `FreeLMModel` as the published facts describe it, built with transformers: a GPT-2
(`transformer`) and a bias-free multi-task head `mtc_head.weight` (tasks, n_embd, largest class count) whose
task t scores `h @ mtc_head.weight[t]` at the last real token after the final LayerNorm, class 1 = true.
Import: such a checkpoint (one task "2", and two tasks "3,2") through `train.init_from` and `freelm eval`'s
loader gives transformers' LM logits and the reference's P(true). Export: `freelm export-hf --format freelm`
loads into the reference class and stock transformers with the pipeline's numbers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2Model, GPT2PreTrainedModel

from conftest import BOOKS
from distributed import run_ranks
from test_eval import chosen, freelm_eval
from test_hf import VOCAB, padded_batch, save_tiny_gpt2
from test_train import REPO, overrides, train_rank

TEXTS = ["It was a truth universally acknowledged [sep] Here, the answer is yes. [cls]",
         "The rain fell on the old town all night [sep] Here, the movie review is emotionally negative. [cls]",
         "Yes [sep] No. [cls]"]


class MultiTaskHead(nn.Module):
    def __init__(self, tasks: int, d_model: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(tasks, d_model, classes))


class AuthorsFreeLM(GPT2PreTrainedModel):
    """The authors' `FreeLMModel` from the facts (its tied LM head is not stored, so it is left out here)."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.classes = [int(c) for c in config.num_multi_task_labels.split(",")]
        self.transformer = GPT2Model(config)
        self.mtc_head = MultiTaskHead(len(self.classes), config.n_embd, max(self.classes))
        self.post_init()

    @torch.no_grad()
    def p_true(self, input_ids: torch.Tensor, lengths: torch.Tensor, task: int) -> torch.Tensor:
        mask = (torch.arange(input_ids.shape[1])[None] < lengths[:, None]).long()
        h = self.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = h[torch.arange(len(h)), lengths - 1] @ self.mtc_head.weight[task]
        return logits[:, : self.classes[task]].softmax(dim=-1)[:, 1]


def save_authors(path: Path, tasks: str, tokenizer: Path, vocab: int = VOCAB) -> AuthorsFreeLM:
    """A checkpoint in the authors' layout with every weight perturbed, and `tokenizer`'s files beside it."""
    torch.manual_seed(0)
    model = AuthorsFreeLM(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=128,
                                     bos_token_id=1, eos_token_id=1, num_multi_task_labels=tasks))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.mtc_head.weight.normal_(std=0.3)
    model.save_pretrained(path)
    shutil.copytree(tokenizer, path, dirs_exist_ok=True)
    return model.eval()


def assert_same_numbers(model, reference: AuthorsFreeLM, lm: nn.Module, tokenizer, task: int) -> None:
    """`model` (a FreeLM) has `lm`'s logits at every real position and the reference's P(true) for `task`."""
    tokens, lengths = padded_batch(tokenizer, TEXTS)
    with torch.no_grad():
        ours, theirs = model(tokens).logits[..., :VOCAB], lm(tokens).logits
        p_true = model(tokens, signal="teacher", lengths=lengths).p_true
    for row, length in enumerate(lengths):
        torch.testing.assert_close(ours[row, :length], theirs[row, :length], rtol=0, atol=1e-5)
    torch.testing.assert_close(p_true, reference.p_true(tokens, lengths, task), rtol=0, atol=1e-5)


def padded_batch_ids(ids: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.data.loaders import right_pad

    return right_pad([torch.from_numpy(np.asarray(row, dtype=np.int64)) for row in ids], pad)


@pytest.mark.parametrize("tasks, task", [("2", 0), ("3,2", 1)])
def test_authors_checkpoint_imports_for_training_and_eval(data, parallel_1, tmp_path, tasks, task):
    from pipeline.config import load_config
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.eval.load import load_hf_dir
    from pipeline.hf.load import check_compatible, load_hf_weights
    from pipeline.model.freelm import FreeLM

    reference = save_authors(tmp_path, tasks, data / "tok")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    teacher = reference.mtc_head.weight[task, :, :2].t()
    cfg = load_config(None, ["model.preset=tiny", f"model.vocab_size={VOCAB}", f"train.init_teacher_task={task}"])
    check_compatible(cfg.model, tmp_path, cfg.train.init_teacher_task)
    model = FreeLM(cfg.model).eval()
    stats = load_hf_weights(model, tmp_path, None, cfg.train.init_teacher_task)
    assert stats.tensors == 4 + 2 * 12 + 1 and stats.teacher == f"from mtc_head.weight, task {task}"
    assert torch.equal(model.teacher_head.weight, teacher)
    assert_same_numbers(model, reference, lm, load_tokenizer(data / "tok"), task)

    evaluated, tokenizer = load_hf_dir(tmp_path, "cpu", task if task else None)
    assert torch.equal(evaluated.teacher_head.weight, teacher)
    assert_same_numbers(evaluated, reference, lm, tokenizer, task)


def test_what_the_teacher_head_cannot_come_from_is_one_clear_error(data, parallel_1, tmp_path):
    from pipeline.errors import ConfigError, DataError
    from pipeline.eval.load import load_hf_dir
    from pipeline.eval.run import evaluate_run
    from pipeline.hf.load import check_compatible
    from pipeline.model.config import ModelConfig

    save_authors(tmp_path / "authors", "3,2", data / "tok")
    config, run = re.escape(str(tmp_path / "authors" / "config.json")), re.escape(str(tmp_path / "run"))
    cfg = ModelConfig(preset="tiny", vocab_size=VOCAB, max_seq_len=128)
    with pytest.raises(ConfigError, match=rf"^train.init_teacher_task=0: task 0 of {config} has 3 classes "
                                          r"\(num_multi_task_labels: '3,2'\); .* the 2-class tasks: \[1\]$"):
        check_compatible(cfg, tmp_path / "authors", 0)
    with pytest.raises(ConfigError, match=rf"^train.init_teacher_task=2: {config} has 2 task\(s\) .* choose 0..1$"):
        check_compatible(cfg, tmp_path / "authors", 2)
    with pytest.raises(ConfigError, match=r"^--task-id=0: task 0 of .* has 3 classes"):
        load_hf_dir(tmp_path / "authors")  # --task-id defaults to 0

    save_tiny_gpt2(tmp_path / "gpt2")  # no tasks: the teacher head starts fresh; eval has no teacher head
    with pytest.raises(ConfigError, match=r"^train.init_teacher_task=1 picks a task of a checkpoint in the FreeLM"):
        check_compatible(cfg, tmp_path / "gpt2", 1)
    with pytest.raises(DataError, match=r"gpt2: no teacher head: neither the FreeLM authors' layout"):
        load_hf_dir(tmp_path / "gpt2")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").touch()
    with pytest.raises(ConfigError, match=rf"^--task-id picks a task of .*; {run} is a training run"):
        evaluate_run(tmp_path / "run", REPO / "recipes" / "tasks.yaml", "dev", task_id=1)

    # A GPT-2 BPE tokenizer that gets [sep] and [cls] added: ids past the checkpoint's embedding rows.
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(BOOKS / "austen-persuasion.txt")], vocab_size=300, special_tokens=["<|endoftext|>"],
              show_progress=False)
    GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(tmp_path / "bpe")
    save_authors(tmp_path / "bpe-model", "2", tmp_path / "bpe", vocab=300)
    with pytest.raises(DataError, match=r"the tokenizer's \[sep\] / \[cls\] ids \(30\d, 30\d\) are past the model's "
                                        r"300 embedding rows"):
        load_hf_dir(tmp_path / "bpe-model")
    with pytest.raises(DataError, match=r"bpe: neither a training run directory .* nor a Hugging Face model"):
        evaluate_run(tmp_path / "bpe", REPO / "recipes" / "tasks.yaml", "dev")  # a tokenizer alone


def test_export_in_the_authors_layout_loads_there_with_our_numbers(data, parallel_1, tmp_path):
    from safetensors import safe_open

    from pipeline.errors import ConfigError
    from pipeline.eval.load import load_hf_dir, load_trained
    from pipeline.hf.export import export_hf, from_pretrained

    run_dir, out = tmp_path / "run", tmp_path / "authors"
    run_ranks(train_rank, 1, overrides(data, run_dir, **{"model.vocab_size": VOCAB, "train.steps": 3}))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "export-hf", "--checkpoint", str(run_dir), "--out", str(out),
                    "--format", "freelm"], cwd=REPO, check=True, capture_output=True, timeout=300)
    assert json.loads((out / "config.json").read_text())["num_multi_task_labels"] == "2"
    ours, tokenizer, _ = load_trained(run_dir)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("mtc_head.weight"), ours.teacher_head.weight.t()[None])
    reference, info = AuthorsFreeLM.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    lm = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(lm).__name__ == "GPT2LMHeadModel"
    assert_same_numbers(ours, reference.eval(), lm, tokenizer, 0)
    tokens, lengths = padded_batch(tokenizer, TEXTS)
    mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():  # our own loaders read it too: from_pretrained, and eval's (authors' layout)
        torch.testing.assert_close(from_pretrained(out).p_true(tokens, mask), reference.p_true(tokens, lengths, 0),
                                   rtol=0, atol=1e-5)
    assert_same_numbers(load_hf_dir(out)[0], reference, lm, tokenizer, 0)
    export_hf(run_dir, tmp_path / "plain")  # eval's loader on a stock-layout export: its teacher_head.safetensors
    assert_same_numbers(load_hf_dir(tmp_path / "plain")[0], reference, lm, tokenizer, 0)

    (tmp_path / "modern").mkdir()  # the modern block has no such layout: refused before any weight is read
    (tmp_path / "modern" / "config.yaml").write_text(
        (run_dir / "config.yaml").read_text().replace("block: gpt2", "block: modern"))
    with pytest.raises(ConfigError, match=r"model.block='modern'; the FreeLM authors' layout \(--format freelm\)"):
        export_hf(tmp_path / "modern", tmp_path / "nothing", layout="freelm")


def test_init_from_authors_layout_under_tp_zero3_and_eval_of_it(data, parallel_1, tmp_path):
    """Training starts from task 1 of a "3,2" checkpoint on TP=2 x ZeRO-3 (one language-only step without weight
    decay leaves the teacher head as imported); `freelm eval --task-id 1` scores its propositions as the reference."""
    from pipeline.data.propositions import proposition_tail, truncate
    from pipeline.data.tasks import load_tasks
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.eval.load import load_trained

    authors, run_dir = tmp_path / "authors", tmp_path / "run"
    reference = save_authors(authors, "3,2", data / "tok")
    run_ranks(train_rank, 2, overrides(data, run_dir, **{
        "model.vocab_size": VOCAB, "train.init_from": authors, "train.init_teacher_task": 1, "train.steps": 1,
        "parallel.tensor_parallel": 2, "train.teacher_steps": 0, "data.teacher": "''", "train.weight_decay": 0}))
    assert torch.equal(load_trained(run_dir)[0].teacher_head.weight, reference.mtc_head.weight[1, :, :2].t())

    limit, positions = 12, reference.config.n_positions
    report = freelm_eval(authors, tmp_path / "eval.json", "--only", "sst2,cola", "--limit", str(limit),
                         "--task-id", "1")
    tokenizer, specs = load_tokenizer(authors), load_tasks(REPO / "recipes" / "tasks.yaml", ["sst2", "cola"])
    for result in report["tasks"]:
        selected, hits = chosen(specs[result["task"]], limit, 0), 0
        for group in selected.groups:
            ids = [truncate(np.asarray(tokenizer.encode(p.input_text) +
                                       tokenizer.encode(proposition_tail(p.proposition_text))),
                            len(tokenizer.encode(p.input_text)), positions) for p in group]
            tokens, lengths = padded_batch_ids(ids, tokenizer.special.pad)
            hits += group[int(reference.p_true(tokens, lengths, 1).argmax())].label
        assert result["n"] == limit and result["accuracy"] == hits / limit, result["task"]

