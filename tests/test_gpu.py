"""What users run on a GPU, on one CUDA device, with DeepSpeed choosing its accelerator itself (no CPU
accelerator forced): bf16 and fp16 ZeRO-3 training under the deepspeed launcher with the shipped
ds_configs, a fused SDPA kernel (flash or cuDNN, the one the trainer reports) seen in the profiler inside the
model's own attention during bf16 training steps, the fused LM loss and compiled blocks on CUDA, `freelm eval`
on CUDA, and `freelm export-hf` loaded by transformers onto CUDA with the pipeline's logits. Skipped where no
CUDA device exists; on a GPU host: `scripts/test.sh tests/test_gpu.py`, or `benchmarks/gpu.sh` for these and
the GPU benchmark."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SDPA_OPS
from distributed import free_port, run_ranks
from test_train import REPO, metrics, overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

BF16, FP16 = REPO / "ds_configs" / "zero3_bf16.json", REPO / "ds_configs" / "zero3_fp16.json"


def gpu_env() -> dict[str, str]:
    """The environment a user's shell has: no DS_ACCELERATOR (DeepSpeed detects CUDA itself)."""
    return {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}


def freelm(*args: str, launcher: bool = False, timeout: int = 1200) -> str:
    """`python -m pipeline.cli ARGS`, or under `deepspeed --num_gpus 1` when `launcher`; returns its output."""
    prefix = (["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
               "--module", "pipeline.cli"] if launcher else ["-m", "pipeline.cli"])
    out = subprocess.run([sys.executable, *prefix, *args], cwd=REPO, env=gpu_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def losses(rows: list[dict]) -> list[float]:
    return [row[key] for row in rows for key in ("loss/language", "loss/teacher") if key in row]


@pytest.fixture(scope="module")
def bf16_run(data, tmp_path_factory) -> Path:
    """A tiny FreeLM trained 8 steps, bf16 ZeRO-3 on one GPU under the deepspeed launcher."""
    run = tmp_path_factory.mktemp("bf16") / "run"
    log = freelm("train", *overrides(data, run, **{"train.steps": 8, "train.ds_config": BF16}), launcher=True)
    (run / "train.log").write_text(log)
    return run


def test_bf16_zero3_trains_on_the_gpu(bf16_run):
    log = (bf16_run / "train.log").read_text()
    assert "grid: world 1 = TP 1 x DP 1; ZeRO stage 3; precision bf16" in log
    assert re.search(r"kernels: attention SDPA \((flash|cuDNN) kernel on cuda\)", log)  # a fused kernel, on CUDA
    rows = metrics(bf16_run)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert len(losses(rows)) == 8 and all(math.isfinite(value) for value in losses(rows))
    assert rows[-1]["train/skipped_steps"] == 0


def test_fp16_zero3_trains_with_dynamic_loss_scaling(data, tmp_path):
    log = freelm("train", *overrides(data, tmp_path, **{"train.steps": 8, "train.ds_config": FP16}), launcher=True)
    assert "precision fp16" in log
    rows = metrics(tmp_path)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert len(losses(rows)) == 8 and all(math.isfinite(value) for value in losses(rows))
    # zero3_fp16.json: dynamic scaling from 2**16, halved on overflow, never below 1: a power of two in [1, 2**16]
    scales = [row["train/loss_scale"] for row in rows]
    assert all(1 <= scale <= 2**16 and math.log2(scale).is_integer() for scale in scales), scales


def fused_loss_on_cuda(out: str) -> None:
    """The fused, chunked LM loss against megatron-core's over whole-batch logits, bf16 on CUDA: losses,
    gradients and the peak memory each needed."""
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from pipeline.model.lm_loss import linear_cross_entropy
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    init_parallel(1)
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = torch.randn(16384, 512, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    targets = torch.randint(0, 16384, (4096,), device="cuda", generator=g)
    weights = torch.full((4096,), 1 / 4096, device="cuda")  # a mean

    def run(loss_fn) -> tuple:
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, losses = loss_fn(hh, ww)
        loss.backward()
        torch.cuda.synchronize()
        return losses.detach(), hh.grad, ww.grad, torch.cuda.max_memory_allocated() - base

    def reference(hh: torch.Tensor, ww: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = vocab_parallel_cross_entropy(F.linear(hh, ww).float(), targets)
        return losses.mean(), losses

    ours = run(lambda hh, ww: linear_cross_entropy(hh, ww, targets, weights, chunk=1024))
    theirs = run(reference)
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(ours[:3], theirs[:3])]
    Path(out).write_text(json.dumps({"diffs": diffs, "peak": [ours[3], theirs[3]],
                                     "scale": [float(t.float().abs().max()) for t in theirs[:3]]}))
    destroy_parallel()


def test_fused_lm_loss_on_cuda_equals_megatrons_and_holds_a_chunk_of_logits(tmp_path):
    run_ranks(fused_loss_on_cuda, 1, str(tmp_path / "out.json"))
    found = json.loads((tmp_path / "out.json").read_text())
    for diff, scale in zip(found["diffs"], found["scale"]):
        assert diff <= 2e-2 * scale, found  # bf16 logits: rounding, not a different loss
    ours, theirs = found["peak"]
    # Whole-batch fp32 logits are 4096 x 16384 x 4 bytes = 256 MiB (and their gradient); a chunk is a quarter.
    assert ours < theirs / 2, found


def test_compiled_blocks_train_like_eager_in_bf16_on_the_gpu(data, tmp_path):
    zero1 = REPO / "ds_configs" / "zero1_bf16.json"
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        freelm("train", *overrides(data, tmp_path / name, **{"train.steps": 6, "train.ds_config": zero1,
                                                            "train.compile": compiled}))
    eager, compiled = losses(metrics(tmp_path / "eager")), losses(metrics(tmp_path / "compiled"))
    assert len(compiled) == 6
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=2e-2)


def profile_rank(args: list[str], out: str) -> None:
    """Train (the trainer's own steps) under the profiler; write the names of every op and kernel it saw, and
    the attention kernel the trainer reports."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.config import load_config
    from pipeline.model.layers import attention_kernel
    from pipeline.train.trainer import train

    cfg = load_config(None, args)
    reported = attention_kernel(cfg.model, cfg.model.n_heads, cfg.data.seq_len, torch.bfloat16,
                                torch.device("cuda"), cfg.model.dropout)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train(cfg)
    Path(out).write_text(json.dumps({"reported": reported,
                                     "events": sorted({event.key for event in prof.key_averages()})}))


def test_a_fused_attention_kernel_serves_the_models_attention_in_bf16_training(data, tmp_path, monkeypatch):
    """Flash or cuDNN attention (torch >= 2.5 prefers cuDNN's on Hopper), the one the trainer reports, forward
    and backward; never the math or memory-efficient fallbacks."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    args = overrides(data, tmp_path / "run", **{"train.steps": 2, "train.ds_config": BF16})
    run_ranks(profile_rank, 1, args, str(tmp_path / "events.json"))
    found = json.loads((tmp_path / "events.json").read_text())
    events = set(found["events"])
    chosen = {kernel for kernel, op in SDPA_OPS.items() if op in events}
    assert chosen == {found["reported"]} and found["reported"] in ("flash", "cuDNN"), (chosen, found["reported"])
    assert SDPA_OPS[found["reported"]] + "_backward" in events  # the backward pass too


def test_eval_on_cuda_through_the_cli(bf16_run, tmp_path):
    report = tmp_path / "eval.json"
    log = freelm("eval", "--checkpoint", str(bf16_run), "--tasks", str(REPO / "recipes" / "tasks.yaml"), "--split",
                 "dev", "--only", "sst2", "--limit", "20", "--json", str(report))
    assert "cuda, bfloat16" in log  # eval's setup line: on the GPU, in the run's precision
    rows = json.loads(report.read_text())["tasks"]
    assert [(row["task"], row["n"]) for row in rows] == [("sst2", 20)]
    assert all(0.0 <= row[key] <= 1.0 for row in rows for key in ("accuracy", "majority", "lm_only"))


def compare_on_cuda(run_dir: str, hf_dir: str) -> None:
    """The pipeline model (fp32 on CUDA) against the fp32 export loaded by transformers onto CUDA."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.loaders import right_pad
    from pipeline.eval.load import load_trained
    from pipeline.hf.export import from_pretrained
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    init_parallel(1)
    model, tokenizer, cfg = load_trained(run_dir)  # fp32 (CPU), then moved
    model = model.cuda()
    vocab = cfg.model.vocab_size
    lm = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).cuda()
    texts = ["It was a truth universally acknowledged", "The rain fell on the old town all night"]
    tokens, lengths = right_pad([torch.tensor(ids) for ids in tokenizer.encode_batch(texts)], tokenizer.special.pad)
    tokens, lengths = tokens.cuda(), lengths.cuda()
    with torch.no_grad():
        ours, theirs = model(tokens).logits[..., :vocab], lm(tokens).logits
        for row, length in enumerate(lengths.tolist()):
            torch.testing.assert_close(theirs[row, :length], ours[row, :length], rtol=1e-4, atol=1e-4)
        exported = from_pretrained(hf_dir, dtype=torch.float32).cuda()
        mask = (torch.arange(tokens.shape[1], device="cuda")[None] < lengths[:, None]).long()
        torch.testing.assert_close(exported.p_true(tokens, mask),
                                   model(tokens, signal="teacher", lengths=lengths).p_true, rtol=1e-4, atol=1e-5)
    destroy_parallel()


def test_export_on_a_gpu_machine_loads_onto_cuda_with_the_pipelines_logits(bf16_run, tmp_path):
    freelm("export-hf", "--checkpoint", str(bf16_run), "--out", str(tmp_path / "bf16"))
    assert json.loads((tmp_path / "bf16" / "freelm.json").read_text())["dtype"] == "bf16"  # the run's precision
    freelm("export-hf", "--checkpoint", str(bf16_run), "--out", str(tmp_path / "fp32"), "--dtype", "fp32")
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", local_files_only=True).cuda()
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cuda"
    run_ranks(compare_on_cuda, 1, str(bf16_run), str(tmp_path / "fp32"))
