"""Decoder building blocks on megatron-core's tensor-parallel layers.

Every parameter is created and initialised inside its own module's `__init__`, so that building the model
under `deepspeed.zero.Init` (which partitions a module's parameters as soon as its constructor returns)
keeps the intended initialisation. Tensors are (batch, seq, hidden) throughout; inside attention and the
MLP each tensor-parallel rank holds `n_heads / tp` heads and `ffn / tp` channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size
from torch import nn
from torch.distributed import ProcessGroup

from pipeline.model.config import ModelConfig


# torch's SDPBackend values, named as the start-up log and the profiler's ops name them.
SDPA_KERNELS = {0: "math", 1: "flash", 2: "memory-efficient", 3: "cuDNN"}


def attention_kernel(cfg: ModelConfig, heads: int, seq_len: int, dtype: torch.dtype, device: torch.device,
                     dropout: float) -> str:
    """The kernel `scaled_dot_product_attention` dispatches the model's attention to (`heads` per TP rank),
    asked of torch's own dispatcher with tensors of that shape: it differs by device, dtype and version (on
    Hopper, torch >= 2.5 prefers cuDNN's fused attention to flash)."""
    q = torch.empty(1, heads, seq_len, cfg.head_dim, dtype=dtype, device=device)
    return SDPA_KERNELS.get(int(torch._fused_sdp_choice(q, q, q, None, dropout, True)), "unknown")


class _Linear(torch.autograd.Function):
    """`F.linear` that keeps the weight itself for backward, where autograd would keep a transposed view of
    it. Under ZeRO-3 that view held each gathered weight's storage until backward, after DeepSpeed had released
    the weight: 5.14 GiB per rank against 4.29 at the 0.3b preset, DP 2 (`benchmarks/memory.py`). DeepSpeed
    gathers the block again before its backward, which then reads the weight as it is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, keeping the weight itself for backward (`_Linear`)."""
    return _Linear.apply(x, weight, bias)


class _SingleRankLinear:
    """At TP=1, where megatron-core's parallel linears have nothing to communicate, their forward is one
    `linear`: the bias fused into the matmul (megatron's function adds the bias separately and
    reshapes for the weight gradient: 0.9x the speed of `nn.Linear` on CPU). At TP>1, megatron's forward,
    which also keeps the weight itself; either way the output alone (no separate bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() == 1:
            return linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class ColumnLinear(_SingleRankLinear, ColumnParallelLinear):
    """megatron-core's column-parallel linear (no gathered output), `_SingleRankLinear` at TP=1."""


class RowLinear(_SingleRankLinear, RowParallelLinear):
    """megatron-core's row-parallel linear (input already split, bias added after the reduce),
    `_SingleRankLinear` at TP=1."""


def normal_init(std: float):
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.block == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class LearnedPositions(nn.Module):
    """GPT-2's learned absolute position embedding (replicated on every TP rank)."""

    def __init__(self, max_seq_len: int, d_model: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_seq_len, d_model))
        nn.init.normal_(self.weight, std=std)

    def forward(self, seq_len: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(seq_len, d_model) for positions 0..seq_len-1, or (batch, seq, d_model) for explicit `positions`."""
        return self.weight[:seq_len] if positions is None else self.weight[positions]


def rotary(x: torch.Tensor, theta: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position embedding on (batch, seq, heads, head_dim), rotate-half layout (as HF LLaMA), at
    positions 0..seq-1 or the explicit (batch, seq) `positions`. Angles are computed in fp32 on every call, so
    bf16 casts of the model never touch them."""
    seq, half = x.shape[1], x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    at = torch.arange(seq, device=x.device)[None] if positions is None else positions
    angles = at.float()[..., None] * inv_freq  # (batch or 1, seq, half)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal multi-head self-attention; heads are split over the TP group.

    The fused QKV projection's output is laid out per head as (head, [q, k, v], head_dim), so a contiguous
    column-parallel split hands each rank whole heads.
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: ProcessGroup | None):
        super().__init__()
        self.cfg = cfg
        self.local_heads = cfg.n_heads // get_pg_size(tp_group)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.qkv = ColumnLinear(
            cfg.d_model, 3 * cfg.d_model, config=mp, init_method=normal_init(cfg.init_std),
            bias=cfg.bias, gather_output=False, tp_group=tp_group,
        )
        self.proj = RowLinear(
            cfg.d_model, cfg.d_model, config=mp, init_method=normal_init(out_std),
            bias=cfg.bias, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` None: causal attention. Otherwise a boolean (batch, 1, seq, seq) mask (True: may attend),
        with the (batch, seq) `positions` the tokens stand at (packed rows; see `FreeLM.trunk`)."""
        batch, seq, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.view(batch, seq, self.local_heads, 3, self.cfg.head_dim).unbind(dim=3)
        if self.cfg.block == "modern":
            q, k = rotary(q, self.cfg.rope_theta, positions), rotary(k, self.cfg.rope_theta, positions)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, dropout_p=self.cfg.dropout if self.training else 0.0,
        )
        out = self.proj(y.transpose(1, 2).reshape(batch, seq, -1))
        return out


class GeluMLP(nn.Module):
    """GPT-2's MLP: d -> ffn (column-parallel), tanh-GELU, ffn -> d (row-parallel)."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: ProcessGroup | None):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.fc = ColumnLinear(
            cfg.d_model, cfg.ffn_size, config=mp, init_method=normal_init(cfg.init_std),
            bias=True, gather_output=False, tp_group=tp_group,
        )
        self.proj = RowLinear(
            cfg.ffn_size, cfg.d_model, config=mp, init_method=normal_init(out_std),
            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        out = self.proj(F.gelu(h, approximate="tanh"))
        return out


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x)), gate and up column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: ProcessGroup | None):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        column = dict(config=mp, init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                      tp_group=tp_group)
        self.gate = ColumnLinear(cfg.d_model, cfg.ffn_size, **column)
        self.up = ColumnLinear(cfg.d_model, cfg.ffn_size, **column)
        self.down = RowLinear(
            cfg.ffn_size, cfg.d_model, config=mp, init_method=normal_init(out_std),
            bias=False, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(F.silu(self.gate(x)) * self.up(x))
        return out


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, tp_group: ProcessGroup | None):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, mp, tp_group)
        self.mlp_norm = make_norm(cfg)
        self.mlp = (GeluMLP if cfg.block == "gpt2" else SwiGLU)(cfg, mp, tp_group)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), positions, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))
