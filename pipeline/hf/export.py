"""`freelm export-hf`: a training checkpoint -> a Hugging Face directory, and `from_pretrained` back.

The directory loads offline with stock `AutoModelForCausalLM` (a `GPT2LMHeadModel` or `LlamaForCausalLM`);
beside the model it holds the teacher head (`teacher_head.safetensors`), the tokenizer and `freelm.json`
(the FreeLM config and where the weights came from). `from_pretrained` returns the LM with its teacher
head, for scoring propositions outside this pipeline.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.hf.convert import hf_config, to_hf
from pipeline.model.config import ModelConfig

TEACHER_FILE = "teacher_head.safetensors"
META_FILE = "freelm.json"


def export_hf(run_dir: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Consolidate the run's checkpoint `tag` (default: latest; ZeRO partitions and TP shards joined) and
    write it to `out` as a Hugging Face model directory. Returns `out`."""
    from safetensors.torch import save_file
    from pipeline.checkpoint.io import latest_tag
    from pipeline.checkpoint.consolidate import consolidate

    run_dir, out = Path(run_dir), Path(out)
    cfg = load_config(run_dir / "config.yaml")
    tag = tag or latest_tag(run_dir / "checkpoints")
    weights = consolidate(run_dir / "checkpoints", cfg.model, tag)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    teacher = weights.pop("teacher_head.weight")
    state = {}
    for name, tensor in weights.items():
        state.update(to_hf(cfg.model.block, name, tensor, cfg.model))
    out.mkdir(parents=True, exist_ok=True)
    hf_config(cfg.model, asdict(tokenizer.special)).save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})  # the LM head is tied: not stored
    save_file({"weight": teacher.contiguous()}, out / TEACHER_FILE)
    tokenizer.save(out)
    meta = {"model": asdict(cfg.model), "source": {"run_dir": str(run_dir.resolve()), "checkpoint": tag},
            "teacher_head": TEACHER_FILE, "special": asdict(tokenizer.special)}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


class ExportedFreeLM(nn.Module):
    """An exported FreeLM: `lm` (the stock transformers model), `teacher_head` (d_model -> [false, true]) on
    the final-norm hidden state of the last real token, and the `tokenizer`."""

    def __init__(self, lm: nn.Module, teacher_head: nn.Linear, tokenizer: Tokenizer, config: ModelConfig):
        super().__init__()
        self.lm, self.teacher_head, self.tokenizer, self.config = lm, teacher_head, tokenizer, config

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 2) logits for right-padded `input_ids` ("<input> [sep] <proposition> [cls]")."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0]), attention_mask.sum(dim=1) - 1]
        return self.teacher_head(last)

    def p_true(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.teacher_logits(input_ids, attention_mask).float().softmax(dim=-1)[:, 1]


def from_pretrained(path: str | Path, **kwargs) -> ExportedFreeLM:
    """Load a `freelm export-hf` directory; `kwargs` go to `AutoModelForCausalLM.from_pretrained`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    config = ModelConfig(**meta["model"])
    lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    head = nn.Linear(config.d_model, 2, bias=False, dtype=lm.dtype)
    head.weight.data.copy_(load_file(str(path / meta["teacher_head"]))["weight"])
    return ExportedFreeLM(lm, head, load_tokenizer(path), config).eval()
