"""Config loading, presets and the errors a bad config gets before any process starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model.presets import PRESETS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_yaml_preset_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: 0.3b\n  dropout: 0.1\nparallel:\n  tensor_parallel: 2\n")
    cfg = load_config(recipe, ["model.n_layers=4", "model.norm_eps=1e-6"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (4, 1024, 16)
    assert cfg.model.dropout == 0.1 and cfg.model.norm_eps == 1e-6 and cfg.parallel.tensor_parallel == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.preset=7b"], "model.preset: unknown preset '7b'; known presets: tiny"),
        (["model.n_head=4"], "unknown config key 'model.n_head'"),
        (["trainer.lr=1"], "unknown config key 'trainer'"),
        (["model.d_model=big"], "model.d_model: expected int, got 'big'"),
        (["model.block=mamba"], "model.block: expected 'gpt2' or 'modern'"),
        (["model.preset=0.3b", "parallel.tensor_parallel=3"], r"model.n_heads \(16\) must be divisible by parallel.tensor_parallel \(3\)"),
        (["model.preset=tiny", "model.ffn_hidden=250", "parallel.tensor_parallel=4"], r"model.ffn_hidden \(250\) must be divisible"),
        (["model.preset=0.3b", "model.vocab_size=50257", "model.vocab_pad_multiple=0", "parallel.tensor_parallel=2"],
         r"model.vocab_size \(50257\) is not divisible by parallel.tensor_parallel \(2\) after padding"),
        (["model.d_model=66"], r"model.d_model \(66\) must be divisible by model.n_heads \(4\)"),
        (["model"], "not of the form key=value"),
        (["train.schedule=mixed", "train.teacher_steps=0"], r"train.teacher_steps must be >= 1 \(0 only with"),
        (["train.language_steps=0"], "train.language_steps must be >= 1"),
        (["data.teacher_task_weights={sst2: 2, cola: many}"], "data.teacher_task_weights.cola: expected float, got 'many'"),
        (["data.corpus_weights=[1, x]"], r"data.corpus_weights\[1\]: expected float, got 'x'"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_vocab_padding_is_explicit():
    cfg = load_config(None, ["model.preset=0.3b", "model.vocab_size=50257"]).model
    assert cfg.padded_vocab_size(1) == 50304 and cfg.padded_vocab_size(8) == 51200
    assert load_config(None, ["model.preset=0.3b", "model.vocab_size=50257", "model.vocab_pad_multiple=0"]).model.padded_vocab_size(1) == 50257


def freelm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


def test_model_info_0_3b_is_gpt2_medium():
    out = freelm("model-info", "--preset", "0.3b", "--json", "model.vocab_pad_multiple=0")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["total_params"] == 354_823_168
    assert info["params_per_tp_rank"] == 354_823_168
    assert info["non_embedding_params"] == 354_823_168 - 50257 * 1024 - 1024 * 1024
    assert info["teacher_head_params"] == 2048


def test_model_info_13b_tp8():
    out = freelm("model-info", "--preset", "13b", "--tp", "8", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert {"total_params", "params_per_tp_rank", "non_embedding_params", "flops_per_token"} <= info.keys()
    assert abs(info["total_params"] - 13e9) / 13e9 < 0.05
    # 8 shards of everything but the norms; the padded vocab (51200) splits evenly.
    assert info["total_params"] / 8 < info["params_per_tp_rank"] < info["total_params"] / 8 * 1.001
    assert 6 * info["total_params"] < info["flops_per_token"] < 7 * info["total_params"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_on_meta(preset):
    from pipeline.model.size import measure

    cfg = load_config(None, [f"model.preset={preset}", "model.vocab_size=50257"]).model
    size = measure(cfg)
    assert size.params_per_tp_rank == size.total_params > size.non_embedding_params > 0


def test_cli_reports_config_errors_in_one_line():
    out = freelm("model-info", "--preset", "0.3b", "--tp", "3")
    assert out.returncode == 2
    assert out.stderr.strip() == "freelm: config error: model.n_heads (16) must be divisible by parallel.tensor_parallel (3)"


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml") if p.name != "tasks.yaml"))
def test_shipped_recipes_load(recipe):
    cfg = load_config(RECIPES / recipe)
    assert cfg.data.seq_len <= cfg.model.max_seq_len and cfg.train.ds_config.startswith("ds_configs/")
