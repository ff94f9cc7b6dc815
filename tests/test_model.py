"""The FreeLM model on one process: signals, the teacher head's reading position, initialisation."""

from __future__ import annotations

import pytest
import torch

from conftest import SDPA_OPS
from pipeline.model.config import ModelConfig


@pytest.fixture(params=["gpt2", "modern"])
def model(request, parallel_1):
    from pipeline.model.freelm import FreeLM

    torch.manual_seed(0)
    return FreeLM(ModelConfig(block=request.param, n_layers=2, d_model=32, n_heads=4, vocab_size=200, max_seq_len=32))


def test_teacher_head_reads_last_real_token(model):
    """Changing what sits in the padding, or how much padding there is, leaves P(true) unchanged."""
    g = torch.Generator().manual_seed(1)
    real = [torch.randint(0, 200, (n,), generator=g) for n in (5, 11, 8)]
    lengths = torch.tensor([len(r) for r in real])

    def padded(width: int, fill: int) -> torch.Tensor:
        out = torch.full((3, width), fill)
        for i, r in enumerate(real):
            out[i, : len(r)] = r
        return out

    a = model(padded(12, 0), signal="teacher", lengths=lengths).p_true
    b = model(padded(20, 7), signal="teacher", lengths=lengths).p_true
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ...while the last real token does matter.
    changed = padded(12, 0)
    changed[0, 4] = (changed[0, 4] + 1) % 200
    assert not torch.allclose(model(changed, signal="teacher", lengths=lengths).p_true[0], a[0])


def test_signals_return_losses_and_eval_outputs(model):
    tokens = torch.randint(0, 200, (2, 10))
    lang = model(tokens[:, :-1], signal="language", targets=tokens[:, 1:])
    assert lang.token_loss.shape == (2, 9)
    torch.testing.assert_close(lang.loss, lang.token_loss.mean())
    assert abs(lang.loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # ~uniform over padded vocab
    masked = model(tokens[:, :-1], signal="language", targets=tokens[:, 1:], loss_mask=torch.tensor([[1] * 9, [0] * 9]))
    torch.testing.assert_close(masked.loss, lang.token_loss[0].mean())
    assert model(tokens, signal="language").logits.shape == (2, 10, model.vocab_size)
    teach = model(tokens, signal="teacher", lengths=torch.tensor([10, 3]), labels=torch.tensor([1, 0]))
    assert teach.logits.shape == (2, 2) and teach.loss.item() > 0
    assert ((teach.p_true > 0) & (teach.p_true < 1)).all()
    with pytest.raises(ValueError, match="unknown signal"):
        model(tokens, signal="both")


def test_lm_head_is_tied_and_init_is_gpt2_style(model):
    assert model.lm_head.weight is model.embed.weight
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002
    assert abs(model.teacher_head.weight.std().item() - 0.02) < 0.01
    proj = model.blocks[0].attn.proj.weight
    assert abs(proj.std().item() - 0.02 / 2) < 0.003  # scaled by 1/sqrt(2 * n_layers)
    if model.positions is not None:
        assert abs(model.positions.weight.std().item() - 0.02) < 0.002


def test_the_reported_attention_kernel_is_the_one_that_runs(model):
    """The start-up log's attention kernel (torch's dispatcher, asked with tensors of the model's shape) is the
    SDPA op the profiler sees in the model's own forward."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.model.layers import attention_kernel

    cfg = model.cfg
    reported = attention_kernel(cfg, cfg.n_heads, 16, torch.float32, torch.device("cpu"), dropout=0.0)
    model.eval()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randint(0, 200, (2, 16)))
    seen = {kernel for kernel, op in SDPA_OPS.items()
            if any(event.key.startswith(op) for event in prof.key_averages())}
    assert seen == {reported}
