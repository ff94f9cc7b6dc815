"""The one registry of model sizes.

`0.3b` is GPT-2 medium, the paper's model (354,823,168 parameters with tied embeddings and the GPT-2
vocab unpadded). The multi-billion presets take the GPT-3 family's depth, width and head counts
(Brown et al. 2020, table 2.1) with the modern block (RoPE, RMSNorm, SwiGLU at LLaMA's 8/3 width), which
trains more stably at these sizes; `13b` uses width 5120 instead of GPT-3's 5140 so that 40 heads of
128 divide it (as LLaMA-13B does). All keep FreeLM's tied LM head. No preset fixes the vocabulary:
`model.vocab_size` follows the run's tokenizer (50,260 ids for GPT-2's BPE with pad, `[sep]` and `[cls]`
added), padded for TP. The tiny presets are for tests and demos.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "tiny": dict(block="gpt2", n_layers=2, d_model=64, n_heads=4, max_seq_len=128),
    "tiny-modern": dict(block="modern", n_layers=2, d_model=64, n_heads=4, max_seq_len=128),
    "0.3b": dict(block="gpt2", n_layers=24, d_model=1024, n_heads=16, max_seq_len=1024),
    "1.3b": dict(block="modern", n_layers=24, d_model=2048, n_heads=16, max_seq_len=2048),
    "2.7b": dict(block="modern", n_layers=32, d_model=2560, n_heads=32, max_seq_len=2048),
    "6.7b": dict(block="modern", n_layers=32, d_model=4096, n_heads=32, max_seq_len=2048, ffn_hidden=11008),
    "13b": dict(block="modern", n_layers=40, d_model=5120, n_heads=40, max_seq_len=2048, ffn_hidden=13824),
}
