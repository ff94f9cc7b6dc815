"""Hugging Face export and import.

Export: a checkpoint trained with TP=2 under ZeRO-3, exported by `freelm export-hf`, loads with stock
`AutoModelForCausalLM` and computes the pipeline's logits; `from_pretrained` gives its teacher scores; a bf16
export holds the fp32 export's tensors rounded, and a sharded one the same tensors. The streaming reader of
ZeRO partitions equals DeepSpeed's own `zero_to_fp32` for ZeRO-1, 2 and 3.
Import: a tiny GPT-2 written by `save_pretrained`, loaded into a TP=2 x DP=2 model (ZeRO-3, read on data-parallel
rank 0 only; ZeRO-1, read on every rank), computes GPT-2's logits; a (language-only) training run starts from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from test_train import REPO, metrics, overrides, train_rank

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


def safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for f in sorted(path.glob("model*.safetensors")) for name, t in load_file(f).items()}


@pytest.mark.parametrize("preset, architecture", [("tiny", "GPT2LMHeadModel"), ("tiny-modern", "LlamaForCausalLM")])
def test_export_reloads_in_transformers_with_equal_logits(data, tmp_path, preset, architecture):
    from pipeline.hf.export import export_hf

    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    run_ranks(train_rank, 2, overrides(data, run_dir, **{"model.preset": preset, "model.vocab_size": VOCAB,
                                                         "parallel.tensor_parallel": 2, "train.steps": 3}))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "export-hf", "--checkpoint", str(run_dir), "--out",
                    str(hf_dir)], cwd=REPO, check=True, capture_output=True, timeout=300)
    meta = json.loads((hf_dir / "freelm.json").read_text())
    assert meta["source"]["checkpoint"] == "step_00000003" and (hf_dir / "teacher_head.safetensors").exists()
    assert meta["dtype"] == "fp32"  # the run trained in fp32 (ds_configs/zero3.json)
    run_ranks(compare_export, 1, str(run_dir), str(hf_dir), architecture)

    # bf16: the same tensors rounded; sharded: the same tensors, in files of at most 100 kB plus an index.
    export_hf(run_dir, tmp_path / "bf16", dtype="bf16")
    export_hf(run_dir, tmp_path / "sharded", max_shard_bytes=100_000)
    fp32, bf16, sharded = (safetensors_dir(tmp_path / name) for name in ("hf", "bf16", "sharded"))
    assert bf16.keys() == fp32.keys() == sharded.keys()
    for name, tensor in fp32.items():
        assert tensor.dtype == torch.float32 and torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
        assert torch.equal(sharded[name], tensor), name
    weight_map = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and weight_map.keys() == fp32.keys() and set(weight_map.values()) == {f.name for f in files}
    for f in files:  # a file holds at most 100 kB of tensors, unless it holds one larger tensor alone
        held = [fp32[name] for name, file in weight_map.items() if file == f.name]
        assert len(held) == 1 or sum(t.numel() * 4 for t in held) <= 100_000
    from transformers import AutoModelForCausalLM

    single, split, half = (AutoModelForCausalLM.from_pretrained(tmp_path / name, local_files_only=True)
                           for name in ("hf", "sharded", "bf16"))
    assert half.dtype == torch.bfloat16
    tokens = torch.arange(24).view(2, 12)
    with torch.no_grad():
        assert torch.equal(split(tokens).logits, single(tokens).logits)


def test_partition_reader_equals_deepspeed_zero_to_fp32(data, tmp_path):
    """ZeRO-3 over DP=2 x TP=2, ZeRO-1 over DP=2 x TP=2 and ZeRO-2 over DP=2 (fp32): every TP rank's merged
    weights equal DeepSpeed's reference consolidation of that rank's files, bit for bit."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.checkpoint.consolidate import MP_RANK, tensor_parallel_degree, tp_shard_state

    grid = {"parallel.tensor_parallel": 2, "train.micro_batch": 4, "train.teacher_micro_batch": 8}
    for stage in (1, 2):
        ds_config = json.loads((REPO / "ds_configs" / f"zero{stage}_bf16.json").read_text())
        del ds_config["bf16"]
        (tmp_path / f"zero{stage}.json").write_text(json.dumps(ds_config))
    runs = {"zero3": (4, grid), "zero1": (4, {**grid, "train.ds_config": tmp_path / "zero1.json"}),
            "zero2": (2, {"train.ds_config": tmp_path / "zero2.json"})}
    for name, (ranks, extra) in runs.items():
        run_ranks(train_rank, ranks, overrides(data, tmp_path / name, **{"train.steps": 2, **extra}))
        ckpt, tag = tmp_path / name / "checkpoints", "step_00000002"
        for tp_rank in range(tensor_parallel_degree(ckpt, tag)):
            view = tmp_path / f"{name}-tp{tp_rank}" / tag  # zero_to_fp32 reads TP rank 0's file names only
            view.mkdir(parents=True)
            for f in (ckpt / tag).glob(f"*mp_rank_{tp_rank:02d}_*.pt"):
                (view / MP_RANK.sub("mp_rank_00", f.name)).symlink_to(f)
            with contextlib.redirect_stdout(io.StringIO()):
                reference = get_fp32_state_dict_from_zero_checkpoint(str(view.parent), tag=tag)
            ours = tp_shard_state(ckpt, tp_rank, tag)
            assert ours.keys() == reference.keys(), name
            for key, tensor in reference.items():
                assert torch.equal(ours[key], tensor), f"{name} TP rank {tp_rank}: {key}"
                assert not ours[key].requires_grad  # no autograd link back to the mapped files

    # An incomplete checkpoint is one line naming what is missing: from its manifest, or without one (a
    # checkpoint saved by other tools) from the partition files found.
    step = tmp_path / "zero3" / "checkpoints" / "step_00000002"
    (step / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()

    def export_error() -> str:
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "export-hf", "--checkpoint",
                              str(tmp_path / "zero3"), "--out", str(tmp_path / "hf")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2
        return out.stderr.strip().splitlines()[-1]

    assert export_error() == (f"freelm: data error: checkpoint {step} is damaged: "
                              f"{step / 'zero_pp_rank_1_mp_rank_01_optim_states.pt'} is missing")
    (step / "manifest.json").unlink()
    assert export_error() == (
        f"freelm: data error: {step}: TP rank 1 was partitioned over "
        "2 data-parallel ranks; the partition files of DP ranks [1] are missing or extra")


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


def import_rank(hf_dir: str, ds_config_file: str, out: str) -> None:
    """Load GPT-2 into a TP=2 x DP=2 FreeLM; every rank compares full logits with transformers' and reports
    what its import read."""
    import deepspeed
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import GPT2LMHeadModel

    from pipeline.config import load_config
    from pipeline.hf.load import load_hf_weights
    from pipeline.model.freelm import FreeLM
    from pipeline.parallel.distributed import destroy_parallel, init_parallel
    from pipeline.parallel.ds_config import deepspeed_config
    from pipeline.parallel.engine import build_model

    init_parallel(2)
    cfg = load_config(None, ["model.preset=tiny", f"model.vocab_size={VOCAB}", "parallel.tensor_parallel=2"])
    ds_config = deepspeed_config(ds_config_file, 1, 1, 1.0)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    model = build_model(lambda: FreeLM(cfg.model), ds_config)
    teacher = model.teacher_head.weight
    teacher_before = (teacher.ds_tensor if zero3 else teacher).clone()
    stats = load_hf_weights(model, hf_dir, ps.get_tensor_model_parallel_group())
    if zero3:
        assert all(p.numel() == 0 for p in model.parameters())  # still partitioned
    assert torch.equal(teacher.ds_tensor if zero3 else teacher, teacher_before)  # the teacher head is not imported
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=zero3):
        shard = model(tokens).logits
        parts = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(parts, shard, group=ps.get_tensor_model_parallel_group())
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(hf_dir, local_files_only=True)(tokens).logits
    torch.testing.assert_close(torch.cat(parts, dim=-1)[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)
    report = {"dp_rank": ps.get_data_parallel_rank(), "tensors": stats.tensors, "bytes": stats.bytes_read}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    destroy_parallel()


def test_import_gpt2_into_tp_zero3_and_train(data, tmp_path):
    from safetensors import safe_open

    hf_dir = tmp_path / "gpt2"
    save_tiny_gpt2(hf_dir)
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:  # every stored tensor is read once
        checkpoint_bytes = sum(4 * torch.Size(f.get_slice(name).get_shape()).numel() for name in f.keys())
    zero1 = json.loads((REPO / "ds_configs" / "zero1_bf16.json").read_text())
    del zero1["bf16"]
    (tmp_path / "zero1.json").write_text(json.dumps(zero1))
    for name, ds_config in (("zero3", ZERO3), ("zero1", tmp_path / "zero1.json")):
        (tmp_path / name).mkdir()
        run_ranks(import_rank, 4, str(hf_dir), str(ds_config), str(tmp_path / name))
        reports = [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(4)]
        assert [r["tensors"] for r in reports] == [4 + 2 * 12] * 4  # 2 embeddings, final norm (2), 12 per block
        # ZeRO-3: data-parallel rank 0 of each TP rank reads the checkpoint, the others nothing; ZeRO-1: all read
        expected = [checkpoint_bytes if name == "zero1" or r["dp_rank"] == 0 else 0 for r in reports]
        assert [r["bytes"] for r in reports] == expected
        assert sorted(r["dp_rank"] for r in reports) == [0, 0, 1, 1]

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


@pytest.mark.parametrize("kind, change, named", [
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings: false"),
    ("gpt2", {"activation_function": "relu"}, "activation_function: 'relu'"),
    ("llama", {"tie_word_embeddings": False}, "tie_word_embeddings: false"),
    ("llama", {"num_key_value_heads": 2}, "num_key_value_heads < num_attention_heads"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
    ("llama", {"attention_bias": True}, "attention_bias: true"),
    ("llama", {"mlp_bias": True}, "mlp_bias: true"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling / rope_parameters.rope_type"),
])
def test_import_refuses_what_freelm_cannot_represent_naming_the_key(tmp_path, kind, change, named):
    """Each model written by save_pretrained; init_from stops before any weight is read, naming the key."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.hf.load import check_compatible

    if kind == "gpt2":
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, **change)
        GPT2LMHeadModel(config).save_pretrained(tmp_path)
    else:
        base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                    vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True)
        LlamaForCausalLM(LlamaConfig(**(base | change))).save_pretrained(tmp_path)
    cfg = load_config(None, ["model.preset=tiny", f"model.vocab_size={VOCAB}"])
    with pytest.raises(ConfigError) as error:
        check_compatible(cfg.model, tmp_path)
    assert str(error.value).startswith(f"train.init_from: {tmp_path / 'config.json'}: cannot be represented: ")
    assert named in str(error.value)


class PickledByName:
    """Pickles as `getattr(owner, name)`, the way Python 3.11.0-3.11.4 pickle enum members."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_checkpoint_files_from_python_3_11_2_load_and_only_enum_members_come_through_getattr(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.checkpoint.consolidate import load_checkpoint_file
    from pipeline.errors import DataError

    torch.save({"zero_stage": PickledByName(ZeroStageEnum, "weights"), "w": torch.arange(3.0)}, tmp_path / "ok.pt",
               pickle_protocol=2)
    loaded = load_checkpoint_file(tmp_path / "ok.pt")
    assert loaded["zero_stage"] is ZeroStageEnum.weights and loaded["w"].tolist() == [0.0, 1.0, 2.0]
    torch.save({"x": PickledByName(LossScaler, "__init__")}, tmp_path / "bad.pt", pickle_protocol=2)
    with pytest.raises(DataError, match="only enum members are read from a checkpoint"):
        load_checkpoint_file(tmp_path / "bad.pt")
