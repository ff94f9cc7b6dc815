"""FreeLM: one decoder, two signals.

The language signal is next-token prediction through the LM head tied to the (vocab-parallel) input
embedding. The teacher signal is a bias-free d_model -> 2 head on the final hidden state of the last
non-padding token of a right-padded proposition; class 1 means "the proposition is correct". One forward
call computes one signal, as in the paper.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding, copy_to_tensor_model_parallel_region
from megatron.core.utils import get_pg_size, get_tensor_model_parallel_group_if_none
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from pipeline.model.config import ModelConfig
from pipeline.model.layers import Block, LearnedPositions, linear, make_norm, normal_init
from pipeline.model.lm_loss import LMLoss, linear_cross_entropy

Signal = Literal["language", "teacher"]


class LanguageOutput(NamedTuple):
    """`loss`: mean next-token loss over `loss_mask`; `token_loss`: -log p(target) per position
    (batch, seq); `logits`: this rank's vocab shard (batch, seq, vocab/tp), only when no targets are given.
    (Outputs are named tuples so that DeepSpeed ZeRO-3 can find their tensors to hook.)"""

    loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class TeacherOutput(NamedTuple):
    """`logits`: (batch, 2) for [false, true]; `loss`: 2-way cross-entropy when labels are given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None

    @property
    def p_true(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=-1)[:, 1]


class TeacherHead(nn.Module):
    """Bias-free d_model -> 2 classifier, replicated on every TP rank."""

    def __init__(self, d_model: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, d_model))
        nn.init.normal_(self.weight, std=std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return linear(h, self.weight)


class TiedLMHead(nn.Module):
    """Vocab-parallel LM head whose weight is the input embedding's. The input is copied into the TP
    region so its gradient is summed over the ranks' vocab shards. Given targets it returns the fused loss
    (`lm_loss.LMLoss`) instead of logits, never holding a whole micro-batch's logits; the loss runs inside
    this module's forward so that ZeRO-3 gathers the weight for it."""

    def __init__(self, embedding: VocabParallelEmbedding):
        super().__init__()
        self.weight = embedding.weight
        self.tp_group = embedding.tp_group
        self.loss_chunk: int | None = None  # positions per loss chunk (None: lm_loss.chunk_positions)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor | LMLoss:
        """Logits; or with `targets`, the per-position losses and (given `weights`) their weighted sum."""
        h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        if targets is None:
            return F.linear(h, self.weight)
        return linear_cross_entropy(h, self.weight, targets, weights, self.tp_group, self.loss_chunk)


class FreeLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: ProcessGroup | None = None):
        """`tp_group`: the tensor-parallel group (None: megatron's default group, or one process when
        torch.distributed is not initialised, e.g. on the meta device)."""
        super().__init__()
        tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.cfg = cfg
        self.vocab_size = cfg.padded_vocab_size(get_pg_size(tp_group))
        mp = ModelParallelConfig(
            tensor_model_parallel_size=get_pg_size(tp_group),
            use_cpu_initialization=True,
            params_dtype=torch.float32,
        )
        self.embed = VocabParallelEmbedding(
            self.vocab_size, cfg.d_model, init_method=normal_init(cfg.init_std), config=mp, tp_group=tp_group
        )
        self.positions = (
            LearnedPositions(cfg.max_seq_len, cfg.d_model, cfg.init_std) if cfg.block == "gpt2" else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, mp, tp_group) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = TiedLMHead(self.embed)
        self.teacher_head = TeacherHead(cfg.d_model, cfg.init_std)
        self.activation_checkpointing = False  # recompute each block's activations in backward

    def trunk(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (batch, seq, d_model) after the last block, before the final norm. By default causal,
        token i at position i; packed rows (several sequences sharing a prefix, in eval) give the (batch, seq)
        `positions` and a boolean (batch, 1, seq, seq) attention `mask` instead."""
        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(tokens.shape[1], positions)
        x = self.dropout(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, positions, mask, use_reentrant=False)
            else:
                x = block(x, positions, mask)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        signal: Signal = "language",
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> LanguageOutput | TeacherOutput:
        """Language: `tokens` and `targets` (batch, seq), optional 0/1 `loss_mask`.
        Teacher: right-padded `tokens`, `lengths` (batch,) of real tokens, optional 0/1 `labels`."""
        h = self.trunk(tokens)
        if signal == "language":
            if targets is None:
                return LanguageOutput(logits=self.lm_head(self.norm(h)))
            mask = torch.ones_like(targets, dtype=torch.float32) if loss_mask is None else loss_mask.float()
            loss, token_loss = self.lm_head(self.norm(h), targets, mask / mask.sum().clamp(min=1))
            # The teacher head joins with weight 0 so every parameter gets a gradient at every step: ZeRO's
            # flat gradient buffers otherwise re-apply a parameter's last gradient when it gets none.
            loss = loss + 0.0 * self.teacher_head(h[:, -1]).sum()
            return LanguageOutput(loss=loss, token_loss=token_loss)
        if signal == "teacher":
            if lengths is None:
                raise ValueError("the teacher signal needs `lengths` (real tokens per row)")
            last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
            logits = self.teacher_head(self.norm(last))
            loss = None if labels is None else F.cross_entropy(logits.float(), labels)
            return TeacherOutput(logits=logits, loss=loss)
        raise ValueError(f"unknown signal {signal!r}; expected 'language' or 'teacher'")
