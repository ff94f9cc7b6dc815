"""Parameter counts and training FLOPs of a model, measured on the meta device (no memory)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeline.model.config import ModelConfig
from pipeline.model.freelm import FreeLM


@dataclass
class ModelSize:
    """Counts cover the language model (decoder + tied LM head), the convention GPT-2 and GPT-3 sizes are
    quoted in; the teacher head's 2 * d_model parameters are reported on their own."""

    total_params: int
    params_per_tp_rank: int
    non_embedding_params: int
    teacher_head_params: int
    block_params_per_tp_rank: int  # one decoder block, as one TP rank holds it
    vector_params_per_tp_rank: int  # 1-D tensors (norms, biases): what ZeRO-3 keeps resident below its threshold
    flops_per_token: int
    dense_flops_per_token: int  # 6 x (non-embedding params + the LM head's matmul)
    lm_head_flops_per_token: int
    attention_flops_per_position: int
    vocab_size: int
    padded_vocab_size: int
    tensor_parallel: int
    seq_len: int

    def train_flops_per_token(self, seq_len: int) -> int:
        return self.dense_flops_per_token + self.attention_flops_per_position * seq_len

    def teacher_train_flops(self, lengths: list[int]) -> int:
        """FLOPs the teacher signal computes usefully on propositions of these lengths: no LM head (its head
        is d_model x 2), and padding not counted."""
        trunk = self.dense_flops_per_token - self.lm_head_flops_per_token
        return sum(trunk * n + self.attention_flops_per_position * n * n for n in lengths)


def measure(cfg: ModelConfig, tp: int = 1, seq_len: int | None = None) -> ModelSize:
    """Build the model on the meta device at TP=1 with the vocab padded for `tp`; a TP-sharded parameter
    holds numel / tp elements on each rank, a replicated one holds all of them.

    FLOPs per token for training (forward + backward) = 6 * (non-embedding params + the LM head's
    vocab x d_model matmul) + 12 * n_layers * d_model * seq_len for attention scores and values
    (PaLM's accounting, no causal discount).
    """
    cfg.validate(tp)
    seq_len = seq_len or cfg.max_seq_len
    padded = cfg.padded_vocab_size(tp)
    with torch.device("meta"):
        model = FreeLM(dataclasses.replace(cfg, vocab_size=padded, vocab_pad_multiple=0))
    teacher = {id(p) for p in model.teacher_head.parameters()}
    embeddings = {id(model.embed.weight)} | ({id(model.positions.weight)} if model.positions else set())
    params = [p for p in model.parameters() if id(p) not in teacher]
    total = sum(p.numel() for p in params)

    def local(p: torch.Tensor) -> int:
        return p.numel() // tp if getattr(p, "tensor_model_parallel", False) else p.numel()

    per_rank = sum(local(p) for p in params)
    non_embedding = sum(p.numel() for p in params if id(p) not in embeddings)
    lm_head = 6 * padded * cfg.d_model
    dense = 6 * non_embedding + lm_head
    attention = 12 * cfg.n_layers * cfg.d_model
    return ModelSize(
        total_params=total,
        params_per_tp_rank=per_rank,
        non_embedding_params=non_embedding,
        teacher_head_params=sum(p.numel() for p in model.teacher_head.parameters()),
        block_params_per_tp_rank=sum(local(p) for p in model.blocks[0].parameters()),
        vector_params_per_tp_rank=sum(local(p) for p in model.parameters() if p.dim() == 1),
        flops_per_token=dense + attention * seq_len,
        dense_flops_per_token=dense,
        lm_head_flops_per_token=lm_head,
        attention_flops_per_position=attention,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=padded,
        tensor_parallel=tp,
        seq_len=seq_len,
    )
