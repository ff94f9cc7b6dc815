"""The fused, chunked LM loss equals megatron-core's vocab-parallel cross-entropy over the whole micro-batch's
logits: per-position losses, their weighted sum, and the gradients of the hidden states and of the LM head's
shard (computed in forward, scaled in backward), at TP=1 and TP=2, with chunks that do not divide the
positions."""

from __future__ import annotations

import json

import pytest
import torch

from distributed import run_ranks

POSITIONS, D_MODEL, VOCAB = 37, 16, 50


def compare(out_path: str, tp: int) -> None:
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from pipeline.model.lm_loss import linear_cross_entropy
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    init_parallel(tensor_parallel=tp)
    group, rank = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(POSITIONS, D_MODEL, generator=g, dtype=torch.float64).float()
    weight = torch.randn(VOCAB, D_MODEL, generator=g).chunk(tp)[rank].contiguous()
    targets = torch.randint(0, VOCAB, (POSITIONS,), generator=g)
    weights = torch.rand(POSITIONS, generator=g)  # per-position weights: a loss mask over its count, say

    def ours(hh: torch.Tensor, ww: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = linear_cross_entropy(hh, ww, targets, weights, group, chunk=5)
        return out.loss, out.token_loss

    def reference(hh: torch.Tensor, ww: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses = vocab_parallel_cross_entropy(F.linear(hh, ww).float(), targets)
        return (losses * weights).sum(), losses

    def run(loss_fn) -> tuple[torch.Tensor, ...]:
        hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, losses = loss_fn(hh, ww)
        (3.0 * loss).backward()  # an upstream gradient that is not 1
        return losses.detach(), loss.detach(), hh.grad, ww.grad

    ours, reference = run(ours), run(reference)
    diffs = [float((a - b).abs().max()) for a, b in zip(ours, reference)]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(diffs, f)
    destroy_parallel()


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_chunked_loss_equals_megatron_vocab_parallel_cross_entropy(tmp_path, tp):
    out = tmp_path / "diffs.json"
    run_ranks(compare, tp, str(out), tp)
    diffs = json.loads(out.read_text())  # per-position losses, the weighted loss, both gradients
    assert max(diffs) < 1e-5, diffs
