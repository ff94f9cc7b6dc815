"""FreeLM parameter names and layouts <-> Hugging Face transformers checkpoints.

The GPT-2 block maps onto `GPT2LMHeadModel` and the modern block (RoPE, RMSNorm, SwiGLU) onto
`LlamaForCausalLM`; both tie the LM head to the input embedding, as FreeLM does. Conversion works one
parameter at a time on full (TP=1) tensors, so a loader can read, convert and shard one tensor at a time.

Two layouts differ from a plain rename:
  - FreeLM's fused QKV rows are ordered per head, (head, [q, k, v], head_dim), so a column-parallel split
    gives each TP rank whole heads. GPT-2's `c_attn` is [q | k | v]; LLaMA has separate q/k/v projections.
  - GPT-2 stores its projections as `Conv1D`, (in, out): the transpose of a linear layer's weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from pipeline.model.config import ModelConfig

Getter = Callable[[str], torch.Tensor]

# FreeLM name pattern -> (Hugging Face names, layout). "{i}" is the block index.
GPT2_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "embed.weight": (("transformer.wte.weight",), "vocab"),
    "positions.weight": (("transformer.wpe.weight",), "positions"),
    "norm.weight": (("transformer.ln_f.weight",), "same"),
    "norm.bias": (("transformer.ln_f.bias",), "same"),
    "blocks.{i}.attn_norm.weight": (("transformer.h.{i}.ln_1.weight",), "same"),
    "blocks.{i}.attn_norm.bias": (("transformer.h.{i}.ln_1.bias",), "same"),
    "blocks.{i}.attn.qkv.weight": (("transformer.h.{i}.attn.c_attn.weight",), "qkv_conv1d"),
    "blocks.{i}.attn.qkv.bias": (("transformer.h.{i}.attn.c_attn.bias",), "qkv_bias"),
    "blocks.{i}.attn.proj.weight": (("transformer.h.{i}.attn.c_proj.weight",), "conv1d"),
    "blocks.{i}.attn.proj.bias": (("transformer.h.{i}.attn.c_proj.bias",), "same"),
    "blocks.{i}.mlp_norm.weight": (("transformer.h.{i}.ln_2.weight",), "same"),
    "blocks.{i}.mlp_norm.bias": (("transformer.h.{i}.ln_2.bias",), "same"),
    "blocks.{i}.mlp.fc.weight": (("transformer.h.{i}.mlp.c_fc.weight",), "conv1d"),
    "blocks.{i}.mlp.fc.bias": (("transformer.h.{i}.mlp.c_fc.bias",), "same"),
    "blocks.{i}.mlp.proj.weight": (("transformer.h.{i}.mlp.c_proj.weight",), "conv1d"),
    "blocks.{i}.mlp.proj.bias": (("transformer.h.{i}.mlp.c_proj.bias",), "same"),
}
LLAMA_NAMES: dict[str, tuple[tuple[str, ...], str]] = {
    "embed.weight": (("model.embed_tokens.weight",), "vocab"),
    "norm.weight": (("model.norm.weight",), "same"),
    "blocks.{i}.attn_norm.weight": (("model.layers.{i}.input_layernorm.weight",), "same"),
    "blocks.{i}.attn.qkv.weight": (
        tuple(f"model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv_split"),
    "blocks.{i}.attn.proj.weight": (("model.layers.{i}.self_attn.o_proj.weight",), "same"),
    "blocks.{i}.mlp_norm.weight": (("model.layers.{i}.post_attention_layernorm.weight",), "same"),
    "blocks.{i}.mlp.gate.weight": (("model.layers.{i}.mlp.gate_proj.weight",), "same"),
    "blocks.{i}.mlp.up.weight": (("model.layers.{i}.mlp.up_proj.weight",), "same"),
    "blocks.{i}.mlp.down.weight": (("model.layers.{i}.mlp.down_proj.weight",), "same"),
}
NAMES = {"gpt2": GPT2_NAMES, "modern": LLAMA_NAMES}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "modern": "LlamaForCausalLM"}
BLOCK_OF_MODEL_TYPE = {"gpt2": "gpt2", "llama": "modern"}
BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def hf_names(block: str, name: str) -> tuple[tuple[str, ...], str]:
    """The Hugging Face tensor names that hold FreeLM parameter `name`, and the layout that relates them."""
    index = BLOCK_INDEX.search(name)
    pattern = BLOCK_INDEX.sub(".{i}.", name, count=1) if index else name
    if pattern not in NAMES[block]:
        raise KeyError(f"no Hugging Face counterpart for {name!r} ({block} block)")
    targets, layout = NAMES[block][pattern]
    return tuple(t.replace("{i}", index.group(1)) if index else t for t in targets), layout


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[q; k; v] (each heads x head_dim rows) -> FreeLM's per-head interleaved rows."""
    stacked = torch.stack((q, k, v))  # (3, d, ...)
    return stacked.view(3, n_heads, -1, *q.shape[1:]).transpose(0, 1).reshape(3 * q.shape[0], *q.shape[1:])


def _split_heads(fused: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """FreeLM's per-head interleaved QKV rows -> (q, k, v), each heads x head_dim rows."""
    d = fused.shape[0] // 3
    per_head = fused.view(n_heads, 3, -1, *fused.shape[1:]).transpose(0, 1)
    return tuple(part.reshape(d, *fused.shape[1:]) for part in per_head)


def to_hf(block: str, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One full FreeLM tensor -> the Hugging Face tensor(s) it becomes. The embedding loses its TP padding
    rows (the export's vocab is `cfg.vocab_size`)."""
    targets, layout = hf_names(block, name)
    if layout == "vocab":
        tensors = (tensor[: cfg.vocab_size],)
    elif layout == "conv1d":
        tensors = (tensor.t(),)
    elif layout == "qkv_conv1d":
        tensors = (torch.cat(_split_heads(tensor, cfg.n_heads)).t(),)
    elif layout == "qkv_bias":
        tensors = (torch.cat(_split_heads(tensor, cfg.n_heads)),)
    elif layout == "qkv_split":
        tensors = _split_heads(tensor, cfg.n_heads)
    else:
        tensors = (tensor,)
    return {target: t.contiguous() for target, t in zip(targets, tensors)}


def from_hf(block: str, name: str, get: Getter, cfg: ModelConfig, rows: int) -> torch.Tensor:
    """The full FreeLM tensor `name` from a Hugging Face checkpoint read through `get`. `rows`: the FreeLM
    embedding's (padded) vocab; rows past the checkpoint's vocab (added special tokens, TP padding) are set
    to the mean embedding, a neutral start for tokens the checkpoint never saw."""
    targets, layout = hf_names(block, name)
    tensors = [get(target) for target in targets]
    if layout == "vocab":
        source = tensors[0]
        extra = source.mean(dim=0, keepdim=True).expand(rows - source.shape[0], -1)
        return torch.cat((source, extra))
    if layout == "positions":
        return tensors[0][: cfg.max_seq_len]
    if layout == "conv1d":
        return tensors[0].t()
    if layout == "qkv_conv1d":
        return _heads_first(*tensors[0].t().chunk(3), n_heads=cfg.n_heads)
    if layout == "qkv_bias":
        return _heads_first(*tensors[0].chunk(3), n_heads=cfg.n_heads)
    if layout == "qkv_split":
        return _heads_first(*tensors, n_heads=cfg.n_heads)
    return tensors[0]


def hf_config(cfg: ModelConfig, special: dict[str, int] | None = None):
    """The transformers config of the stock class that computes what FreeLM's `cfg` computes."""
    from transformers import GPT2Config, LlamaConfig

    special = special or {}
    ids = dict(bos_token_id=special.get("eos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"))
    if cfg.block == "gpt2":
        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.ffn_size, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True,
            architectures=[ARCHITECTURES["gpt2"]], **ids,
        )
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        attention_dropout=cfg.dropout, hidden_act="silu", tie_word_embeddings=True,
        architectures=[ARCHITECTURES["modern"]], **ids,
    )


def unsupported(config: dict) -> list[str]:
    """What a Hugging Face config.json asks for that FreeLM's blocks cannot represent, each naming its key:
    an output layer of its own, other activations, grouped-query attention, attention or MLP biases (LLaMA),
    scaled or other RoPE."""
    kind = config.get("model_type")
    found = []
    if config.get("tie_word_embeddings", True) is False:
        found.append("tie_word_embeddings: false (an output layer of its own; FreeLM's LM head is the input "
                     "embedding)")
    if kind == "gpt2" and config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        found.append(f"activation_function: {config['activation_function']!r} (FreeLM's GPT-2 block: gelu_new)")
    if kind == "llama":
        if config.get("num_key_value_heads", config["num_attention_heads"]) != config["num_attention_heads"]:
            found.append("num_key_value_heads < num_attention_heads (grouped-query attention)")
        if config.get("hidden_act", "silu") != "silu":
            found.append(f"hidden_act: {config['hidden_act']!r} (FreeLM's modern block: silu)")
        found += [f"{key}: true (FreeLM's modern block has none)" for key in ("attention_bias", "mlp_bias")
                  if config.get(key)]
        rope = config.get("rope_parameters") or {}
        if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            found.append(f"rope_scaling / rope_parameters.rope_type: "
                         f"{config.get('rope_scaling') or rope.get('rope_type')!r} (FreeLM: plain RoPE)")
    return found


def model_config_from_hf(config: dict) -> dict:
    """The `model.*` shape keys a Hugging Face config.json implies (GPT-2 or LLaMA without GQA); ValueError
    naming the config keys FreeLM cannot represent."""
    kind = config.get("model_type")
    if problems := unsupported(config):
        raise ValueError(f"cannot be represented: {'; '.join(problems)}")
    if kind == "gpt2":
        return dict(block="gpt2", n_layers=config["n_layer"], d_model=config["n_embd"], n_heads=config["n_head"],
                    ffn_hidden=config.get("n_inner") or 4 * config["n_embd"], max_seq_len=config["n_positions"],
                    norm_eps=config.get("layer_norm_epsilon", 1e-5))
    if kind == "llama":
        rope = config.get("rope_parameters") or {}
        return dict(block="modern", n_layers=config["num_hidden_layers"], d_model=config["hidden_size"],
                    n_heads=config["num_attention_heads"], ffn_hidden=config["intermediate_size"],
                    max_seq_len=config["max_position_embeddings"], norm_eps=config.get("rms_norm_eps", 1e-6),
                    rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    raise ValueError(f"model_type {kind!r} is not supported (gpt2 or llama)")
