"""The LM head and its cross-entropy fused, over a vocab split across tensor-parallel ranks.

`h @ W.T` for a whole micro-batch is (tokens x vocab/tp) logits, held in fp32 by an ordinary loss, and again
as its gradient: at GPT-2's vocabulary and 8k tokens per micro-batch that is 1.6 GB twice. Here the logits
exist one chunk of positions at a time, in forward and, recomputed, in backward; only each position's
log-sum-exp is kept. Per position the arithmetic is the ordinary one (max, sum of exponentials and target
logit all-reduced over the TP group, as megatron-core's vocab-parallel cross-entropy does), so the losses
and gradients equal it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# Positions per chunk: as many as keep one chunk's fp32 logits at about this many values (128 MB).
CHUNK_VALUES = 2**25


def chunk_positions(vocab_shard: int) -> int:
    return max(1, CHUNK_VALUES // vocab_shard)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                group: ProcessGroup | None) -> torch.Tensor:
        shard = weight.shape[0]
        first = shard * (dist.get_rank(group) if group is not None and dist.is_initialized() else 0)
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(losses)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = (h[rows] @ weight.t()).float()
            top = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
            total = _all_reduce((logits - top[:, None]).exp().sum(dim=-1), dist.ReduceOp.SUM, group)
            local, owned = targets[rows] - first, (targets[rows] >= first) & (targets[rows] < first + shard)
            picked = logits.gather(1, local.clamp(0, shard - 1)[:, None]).squeeze(1) * owned
            picked = _all_reduce(picked, dist.ReduceOp.SUM, group)
            lse[rows] = top + total.log()
            losses[rows] = lse[rows] - picked
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.first = chunk, first
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        shard, first = weight.shape[0], ctx.first
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = ((h[rows] @ weight.t()).float() - lse[rows, None]).exp()
            local, owned = targets[rows] - first, (targets[rows] >= first) & (targets[rows] < first + shard)
            probs[owned.nonzero().squeeze(1), local[owned]] -= 1.0
            grad_logits = probs.mul_(grad_losses[rows, None])
            grad_h[rows] = (grad_logits.to(h.dtype) @ weight).to(h.dtype)
            grad_w.addmm_(grad_logits.t(), h[rows].float())
        return grad_h, grad_w.to(weight.dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         group: ProcessGroup | None = None, chunk: int | None = None) -> torch.Tensor:
    """-log p(target) per position, fp32, of shape `targets.shape`. `h` (..., d_model) must already be in
    the TP region (its gradient summed over the group by the caller); `weight` is this rank's
    (vocab/tp, d_model) shard of the LM head; `chunk`: positions per chunk (default: `chunk_positions`)."""
    flat = h.reshape(-1, h.shape[-1])
    chunk = chunk or chunk_positions(weight.shape[0])
    return _LinearCrossEntropy.apply(flat, weight, targets.reshape(-1), chunk, group).view(targets.shape)
