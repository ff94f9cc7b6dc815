"""The model's shape: one dataclass, torch-free so configs validate before any process starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError


@dataclass
class ModelConfig:
    """Decoder shape. `block="gpt2"` is the paper's architecture (learned positions, LayerNorm, GELU MLP,
    biases); `block="modern"` swaps in RoPE, RMSNorm and a bias-free SwiGLU MLP."""

    preset: str | None = None
    block: Literal["gpt2", "modern"] = "gpt2"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    ffn_hidden: int | None = None
    vocab_size: int | None = None  # None: the tokenizer's size (resolved when the config is loaded)
    vocab_pad_multiple: int = 128  # 0: no padding
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        """FFN width: 4*d for GPT-2; for SwiGLU 8/3*d rounded up to a multiple of 256 (LLaMA's rule)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.block == "gpt2":
            return 4 * self.d_model
        return -(-8 * self.d_model // 3 // 256) * 256

    @property
    def bias(self) -> bool:
        return self.block == "gpt2"

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab rounded up to a multiple of `vocab_pad_multiple * tp` (Megatron's convention);
        `vocab_pad_multiple: 0` switches padding off."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is not known: set it, or data.tokenizer to a prepared tokenizer")
        if self.vocab_pad_multiple == 0:
            return self.vocab_size
        multiple = self.vocab_pad_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, tp: int = 1) -> None:
        """Raise ConfigError naming the key and values for any shape that cannot run at this TP degree."""
        if self.block not in ("gpt2", "modern"):
            raise ConfigError(f"model.block must be 'gpt2' or 'modern', got {self.block!r}")
        for key in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            if key == "vocab_size" and self.vocab_size is None:  # to be resolved from the tokenizer
                continue
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.vocab_pad_multiple < 0:
            raise ConfigError(f"model.vocab_pad_multiple must be >= 0 (0: no padding), got {self.vocab_pad_multiple}")
        if tp < 1:
            raise ConfigError(f"parallel.tensor_parallel must be >= 1, got {tp}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.block == "modern" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head dim; model.d_model / model.n_heads = {self.head_dim}")
        if self.n_heads % tp:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by parallel.tensor_parallel ({tp})"
            )
        if self.ffn_size % tp:
            raise ConfigError(
                f"model.ffn_hidden ({self.ffn_size}) must be divisible by parallel.tensor_parallel ({tp})"
            )
        if self.vocab_size is not None and self.padded_vocab_size(tp) % tp:
            raise ConfigError(
                f"model.vocab_size ({self.vocab_size}) is not divisible by parallel.tensor_parallel ({tp}) "
                f"after padding (model.vocab_pad_multiple={self.vocab_pad_multiple})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
