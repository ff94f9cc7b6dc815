"""The LM head and its cross-entropy fused, over a vocab split across tensor-parallel ranks.

`h @ W.T` for a whole micro-batch is (tokens x vocab/tp) logits, held in fp32 by an ordinary loss, and again
as its gradient: at GPT-2's vocabulary and 8k tokens per micro-batch that is 1.6 GB twice. Here the logits
exist one chunk of positions at a time. The loss is the end of the graph and its weight per position (a mask
over its count) is known in forward, so each chunk's gradients are computed there too, while its logits
exist, and backward only scales them: no logits are recomputed. Per position the arithmetic is the ordinary
one (max, sum of exponentials and target logit all-reduced over the TP group, as megatron-core's
vocab-parallel cross-entropy does), so the losses and gradients equal it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# Positions per chunk: as many as keep one chunk's fp32 logits at about this many values (128 MB).
CHUNK_VALUES = 2**25


class LMLoss(NamedTuple):
    """`loss`: sum over positions of weight x -log p(target) (None without weights); `token_loss`: -log
    p(target) per position, fp32, not differentiable."""

    loss: torch.Tensor | None
    token_loss: torch.Tensor


def chunk_positions(vocab_shard: int) -> int:
    return max(1, CHUNK_VALUES // vocab_shard)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, first: int, group: ProcessGroup | None,
                grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """-log p(target) for one chunk of positions; with `grads` = (weights, grad_h rows, grad_w), also writes
    this chunk's gradients of sum(weights x losses). Its own function so that the chunk's logits are freed on
    return, before the next chunk's exist."""
    shard = weight.shape[0]
    logits = (h @ weight.t()).float()
    top = _all_reduce(logits.amax(dim=-1), dist.ReduceOp.MAX, group)  # amax: max(dim) also finds the argmax, ~4x slower
    logits -= top[:, None]
    local, owned = targets - first, (targets >= first) & (targets < first + shard)
    picked = _all_reduce(logits.gather(1, local.clamp(0, shard - 1)[:, None]).squeeze(1) * owned,
                         dist.ReduceOp.SUM, group)
    exp = logits.exp_()  # in place: the logits are not needed again
    total = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
    if grads is not None:  # d(weights . losses)/d(logits) = weights x (softmax - one-hot of the target)
        weights, grad_h, grad_w = grads
        probs = exp.mul_((weights / total)[:, None])  # one pass: weights x softmax
        rows = owned.nonzero().squeeze(1)
        probs[rows, local[rows]] -= weights[rows]
        grad_h.copy_(probs.to(h.dtype) @ weight)
        grad_w.addmm_(probs.t(), h.float())
    return total.log() - picked


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                chunk: int, group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        first = weight.shape[0] * (dist.get_rank(group) if group is not None and dist.is_initialized() else 0)
        grads = weights is not None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            losses[rows] = _chunk_loss(h[rows], weight, targets[rows], first, group,
                                       (weights[rows], grad_h[rows], grad_w) if grads else None)
        ctx.mark_non_differentiable(losses)
        if grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return (losses * weights).sum() if weights is not None else losses.new_zeros(()), losses

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # this function's own buffers, used once: scaled in place
        scaled = grad_h.mul_(grad_loss.to(grad_h.dtype)), grad_w.mul_(grad_loss.to(grad_w.dtype))
        return *scaled, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, group: ProcessGroup | None = None,
                         chunk: int | None = None) -> LMLoss:
    """`h` (..., d_model) must already be in the TP region (its gradient summed over the group by the caller);
    `weight` is this rank's (vocab/tp, d_model) shard of the LM head; `weights` (shaped like `targets`) weigh
    each position's loss in `loss` (e.g. a loss mask over its count); `chunk`: positions per chunk (default:
    `chunk_positions`)."""
    flat = h.reshape(-1, h.shape[-1])
    chunk = chunk or chunk_positions(weight.shape[0])
    scale = None if weights is None else weights.reshape(-1).float()
    loss, losses = _LinearCrossEntropy.apply(flat, weight, targets.reshape(-1), scale, chunk, group)
    return LMLoss(None if weights is None else loss, losses.view(targets.shape))
