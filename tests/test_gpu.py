"""GPU-only paths: bf16 attention on the fused SDPA kernels and fp16 training with loss scaling.
Skipped where no CUDA device exists (CI's CPU machines); run them on a GPU host with `scripts/test.sh -k gpu`."""

from __future__ import annotations

import pytest
import torch

from test_train import REPO, data, launch, metrics, overrides  # noqa: F401  (data is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_flash_attention_matches_fp32(parallel_1):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.model.config import ModelConfig
    from pipeline.model.freelm import FreeLM

    torch.manual_seed(0)
    model = FreeLM(ModelConfig(n_layers=2, d_model=128, n_heads=4, vocab_size=1024, max_seq_len=256)).cuda()
    tokens = torch.randint(0, 1024, (2, 256), device="cuda")
    reference = model(tokens, signal="language", targets=tokens).loss
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(tokens, signal="language", targets=tokens).loss
    torch.testing.assert_close(fast.float(), reference, rtol=2e-2, atol=2e-2)


def test_fp16_training_logs_the_loss_scale(data, tmp_path):  # noqa: F811
    launch("deepspeed", 1, overrides(data, tmp_path, **{
        "train.steps": 4, "train.ds_config": REPO / "ds_configs" / "zero3_fp16.json"}))
    rows = metrics(tmp_path)
    assert all(row["loss_scale"] > 0 for row in rows)
