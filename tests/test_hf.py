"""Hugging Face export and import.

Export: a checkpoint trained with TP=2 under ZeRO-3, exported by `freelm export-hf`, loads with stock
`AutoModelForCausalLM` and computes the pipeline's logits; `from_pretrained` gives its teacher scores.
Import: a tiny GPT-2 written by `save_pretrained`, loaded into a TP=2 x DP=2 ZeRO-3 model, computes GPT-2's
logits; a (language-only) training run starts from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from test_train import REPO, data, metrics, overrides, train_rank  # noqa: F401  (data: a fixture)

ZERO3 = REPO / "ds_configs" / "zero3.json"
VOCAB = 1000
SENTENCES = ["It was a truth universally acknowledged", "The rain fell on the old town all night", "Yes"]


def padded_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.data.loaders import right_pad

    return right_pad([torch.tensor(ids) for ids in tokenizer.encode_batch(texts)], tokenizer.special.pad)


def compare_export(run_dir: str, hf_dir: str, architecture: str) -> None:
    """Pipeline model (consolidated from the sharded checkpoint) vs the export, on one process."""
    from transformers import AutoModelForCausalLM

    from pipeline.eval.load import load_trained
    from pipeline.hf.export import from_pretrained
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    init_parallel(1)
    model, tokenizer, _ = load_trained(run_dir)
    lm = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    assert type(lm).__name__ == architecture and lm.config.vocab_size == VOCAB
    tokens, lengths = padded_batch(tokenizer, SENTENCES)
    with torch.no_grad():
        ours = model(tokens).logits[..., :VOCAB]
        theirs = lm(tokens).logits
        for row, length in enumerate(lengths):  # positions before the padding
            torch.testing.assert_close(theirs[row, :length], ours[row, :length], rtol=1e-4, atol=1e-4)
        exported = from_pretrained(hf_dir)
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        torch.testing.assert_close(exported.p_true(tokens, mask),
                                   model(tokens, signal="teacher", lengths=lengths).p_true, rtol=1e-4, atol=1e-5)
    assert exported.tokenizer.encode(SENTENCES[0]) == tokenizer.encode(SENTENCES[0])
    destroy_parallel()


@pytest.mark.parametrize("preset, architecture", [("tiny", "GPT2LMHeadModel"), ("tiny-modern", "LlamaForCausalLM")])
def test_export_reloads_in_transformers_with_equal_logits(data, tmp_path, preset, architecture):  # noqa: F811
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    run_ranks(train_rank, 2, overrides(data, run_dir, **{"model.preset": preset, "model.vocab_size": VOCAB,
                                                         "parallel.tensor_parallel": 2, "train.steps": 3}))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "export-hf", "--checkpoint", str(run_dir), "--out",
                    str(hf_dir)], cwd=REPO, check=True, capture_output=True, timeout=300)
    meta = json.loads((hf_dir / "freelm.json").read_text())
    assert meta["source"]["checkpoint"] == "step_00000003" and (hf_dir / "teacher_head.safetensors").exists()
    run_ranks(compare_export, 1, str(run_dir), str(hf_dir), architecture)


def save_tiny_gpt2(path: Path) -> None:
    """A 2-layer GPT-2 with every weight perturbed, so a layout mistake anywhere changes its logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
                                        bos_token_id=1, eos_token_id=1))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)


def import_rank(hf_dir: str, out: str) -> None:
    """Load GPT-2 into a TP=2 x DP=2 ZeRO-3 FreeLM; rank 0 compares full logits with transformers'."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import GPT2LMHeadModel

    from pipeline.config import load_config
    from pipeline.hf.load import load_hf_weights
    from pipeline.model.freelm import FreeLM
    from pipeline.parallel.distributed import destroy_parallel, init_parallel
    from pipeline.parallel.engine import build_model, deepspeed_config

    init_parallel(2)
    cfg = load_config(None, ["model.preset=tiny", f"model.vocab_size={VOCAB}", "parallel.tensor_parallel=2"])
    model = build_model(lambda: FreeLM(cfg.model), deepspeed_config(ZERO3, 1, 1, 1.0))
    teacher_before = model.teacher_head.weight.ds_tensor.clone()
    loaded = load_hf_weights(model, hf_dir, ps.get_tensor_model_parallel_group())
    assert all(p.numel() == 0 for p in model.parameters())  # still partitioned
    assert torch.equal(model.teacher_head.weight.ds_tensor, teacher_before)  # the teacher head is not imported
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
        shard = model(tokens).logits
        parts = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(parts, shard, group=ps.get_tensor_model_parallel_group())
    if dist.get_rank() == 0:
        with torch.no_grad():
            expected = GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)(tokens).logits
        torch.testing.assert_close(torch.cat(parts, dim=-1)[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)
        Path(out).write_text(str(loaded))
    destroy_parallel()


def test_import_gpt2_into_tp_zero3_and_train(data, tmp_path):  # noqa: F811
    hf_dir = tmp_path / "gpt2"
    save_tiny_gpt2(hf_dir)
    run_ranks(import_rank, 4, str(hf_dir), str(tmp_path / "loaded"))
    assert int((tmp_path / "loaded").read_text()) == 4 + 2 * 12  # 2 embeddings, final norm (2), 12 tensors per block

    run_dir = tmp_path / "run"
    run_ranks(train_rank, 2, overrides(data, run_dir, **{
        "model.vocab_size": VOCAB, "train.init_from": hf_dir, "parallel.tensor_parallel": 2, "train.steps": 8,
        "train.teacher_steps": 0, "data.teacher": "''"}))  # language only: no teacher data needed
    language = [row.get("loss/language") for row in metrics(run_dir)]
    assert len(language) == 8 and all(torch.isfinite(torch.tensor(language)))


def test_import_shape_mismatch_names_the_keys(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.hf.load import check_compatible

    save_tiny_gpt2(tmp_path)
    cfg = load_config(None, ["model.preset=tiny", "model.n_layers=3", "model.vocab_size=900"])
    with pytest.raises(ConfigError, match=r"model.n_layers=3, model.vocab_size=900; set model.n_layers=2 "
                                          r"model.vocab_size=>= 1000"):
        check_compatible(cfg.model, tmp_path)
