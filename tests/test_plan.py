"""The vocabulary follows the tokenizer, and `freelm plan` sizes every shipped recipe: known answers for its
arithmetic, the shipped recipes' models built at their own TP degree, and advice that makes a plan fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_ranks
from pipeline.config import load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Each shipped recipe with the cluster it is planned for (the README's table): nodes x 8 GPUs of 80 GiB.
SHIPPED = {"0.3b": 1, "1.3b": 1, "13b": 2}
GPT2_IDS = 50260  # GPT-2's 50,257 plus pad, [sep] and [cls]


def plan_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", "--json", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_vocab_follows_the_tokenizer(gpt2_tokenizer):
    for recipe in SHIPPED:
        cfg = load_config(REPO / "recipes" / f"{recipe}.yaml", [f"data.tokenizer={gpt2_tokenizer}"])
        assert cfg.model.vocab_size == GPT2_IDS
    pinned = load_config(REPO / "recipes" / "0.3b.yaml", [f"data.tokenizer={gpt2_tokenizer}", "model.vocab_size=50257"])
    assert pinned.model.vocab_size == GPT2_IDS and pinned.model.padded_vocab_size() == 50304
    with pytest.raises(ConfigError, match=r"the tokenizer .* has 50260 ids, more than the embedding of "
                                          r"model.vocab_size=50257 \(padded to 50257\)"):
        load_config(REPO / "recipes" / "0.3b.yaml",
                    [f"data.tokenizer={gpt2_tokenizer}", "model.vocab_size=50257", "model.vocab_pad_multiple=0"])
    assert load_config(REPO / "recipes" / "0.3b.yaml", ["data.tokenizer=/nonexistent"]).model.vocab_size is None


def test_model_info_sizes_the_vocab_from_a_tokenizer(gpt2_tokenizer):
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "model-info", "--preset", "0.3b", "--json",
                          "--tokenizer", str(gpt2_tokenizer)], cwd=REPO, capture_output=True, text=True, timeout=120)
    info = json.loads(out.stdout)
    assert info["vocab_size"] == GPT2_IDS and info["padded_vocab_size"] == 50304


@pytest.mark.parametrize("recipe", sorted(SHIPPED))
def test_every_shipped_recipe_fits_its_cluster(recipe, gpt2_tokenizer):
    plan = plan_json("--config", f"recipes/{recipe}.yaml", "--nodes", str(SHIPPED[recipe]), "--tokenizer",
                     str(gpt2_tokenizer))
    assert plan["fits"] and plan["advice"] == "" and plan["vocab_size"] == GPT2_IDS
    assert plan["world_size"] == plan["tensor_parallel"] * plan["data_parallel"] == 8 * SHIPPED[recipe]
    assert plan["memory"]["peak"] <= 80 * 1024**3


def test_plan_arithmetic_known_answers():
    from pipeline.plan import GIB, plan_run

    # GPT-2 medium with the vocab padded to 50304: 354,823,168 + 47 * 1024 padding rows + the 2 x 1024 teacher head.
    psi = 354_823_168 + 47 * 1024 + 2048
    zero3 = ["model.vocab_size=50257", "train.ds_config=ds_configs/zero3_bf16.json"]
    cfg = load_config(REPO / "recipes" / "0.3b.yaml", zero3)
    plan = plan_run(cfg, "", nodes=1, gpus_per_node=8)
    # Norms and biases, kept whole by ZeRO-3: per block two LayerNorms (weight + bias), the qkv, attention-out,
    # fc and mlp-out biases; then the final LayerNorm.
    vectors = 24 * (4 * 1024 + 3 * 1024 + 1024 + 4096 + 1024) + 2 * 1024
    m = plan.memory
    assert plan.params_per_device == psi and plan.zero_stage == 3 and plan.precision == "bf16"
    assert m.params == int(2 * (psi / 8 + vectors * 7 / 8))
    assert (m.grads, m.optimizer) == (int(2 * psi / 8), int(12 * psi / 8))
    assert plan.checkpoint_bytes == 12 * psi + 2 * vectors
    assert plan.tokens_per_step["language"] == 8 * 4 * 8 * 1024 and plan.steps == {"language": 50000, "teacher": 50000}
    # ZeRO-3's model states fall as 1/DP (up to the small tensors it keeps whole).
    states = {}
    for gpus in (1, 2, 4):
        m = plan_run(load_config(REPO / "recipes" / "0.3b.yaml", zero3), "", 1, gpus).memory
        states[gpus] = m.grads + m.optimizer
    assert states[1] == pytest.approx(2 * states[2], rel=1e-6) == pytest.approx(4 * states[4], rel=1e-6)
    # One chunk of the fused loss: 2**25 // 50304 = 667 positions' fp32 logits and probabilities, bf16 logits.
    assert m.logits == 667 * 50304 * (4 + 4 + 2)
    assert plan.memory.peak < 80 * GIB


def test_a_plan_that_does_not_fit_names_the_change_that_does():
    plan = plan_json("--config", "recipes/13b.yaml", "--nodes", "4", "--gpu-memory", "40", "model.vocab_size=50257")
    assert not plan["fits"]
    assert plan["advice"].startswith("does not fit: ") and "set train.activation_checkpointing=true" in plan["advice"]
    fixed = plan_json("--config", "recipes/13b.yaml", "--nodes", "4", "--gpu-memory", "40", "model.vocab_size=50257",
                      "train.activation_checkpointing=true")
    assert fixed["fits"]
    hopeless = plan_json("--config", "recipes/13b.yaml", "--gpu-memory", "4", "model.vocab_size=50257")
    assert not hopeless["fits"] and "no single change makes it fit" in hopeless["advice"]


def build_at_recipe_tp(recipe: str, out: str) -> None:
    """The recipe's model on the meta device, as one TP rank of its TP degree holds it (a fake process group of
    that size: no communication, real megatron-core layers)."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from pipeline.model.freelm import FreeLM

    cfg = load_config(REPO / "recipes" / f"{recipe}.yaml", ["model.vocab_size=50260"])
    tp = cfg.parallel.tensor_parallel
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    with torch.device("meta"):
        model = FreeLM(cfg.model, tp_group=dist.group.WORLD)
    shapes = {name: list(p.shape) for name, p in model.named_parameters()}
    Path(out).write_text(json.dumps({"tp": tp, "params": sum(p.numel() for p in model.parameters()), "shapes": shapes}))
    dist.destroy_process_group()


@pytest.mark.parametrize("recipe", sorted(SHIPPED))
def test_shipped_recipes_build_at_their_tp_as_planned(recipe, tmp_path):
    run_ranks(build_at_recipe_tp, 1, recipe, str(tmp_path / "built.json"))
    built = json.loads((tmp_path / "built.json").read_text())
    plan = plan_json("--config", f"recipes/{recipe}.yaml", "--nodes", str(SHIPPED[recipe]), "model.vocab_size=50260")
    cfg = load_config(REPO / "recipes" / f"{recipe}.yaml", ["model.vocab_size=50260"]).model
    tp = built["tp"]
    assert built["params"] == plan["params_per_device"]
    assert built["shapes"]["blocks.0.attn.qkv.weight"] == [3 * cfg.d_model // tp, cfg.d_model]
    assert built["shapes"]["embed.weight"] == [cfg.padded_vocab_size(tp) // tp, cfg.d_model]
