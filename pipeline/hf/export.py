"""`freelm export-hf`: a training checkpoint -> a Hugging Face directory, and `from_pretrained` back.

The directory loads offline with stock `AutoModelForCausalLM` (a `GPT2LMHeadModel` or `LlamaForCausalLM`);
beside the model it holds the teacher head (`teacher_head.safetensors`), the tokenizer and `freelm.json`
(the FreeLM config and where the weights came from). `from_pretrained` returns the LM with its teacher
head, for scoring propositions outside this pipeline. Layout "freelm" (GPT-2 block only) also writes the
FreeLM authors' layout (`pipeline.hf.freelm_format`): the teacher head as a one-task `mtc_head.weight` beside
the GPT-2 tensors, and `num_multi_task_labels: "2"` in config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import ConfigError, DataError
from pipeline.hf.convert import hf_config, to_hf
from pipeline.hf.freelm_format import MTC_HEAD, TASKS_KEY, mtc_from_teacher
from pipeline.model.config import ModelConfig
from pipeline.parallel.ds_config import DTYPES
from pipeline.progress import progress

TEACHER_FILE = "teacher_head.safetensors"
META_FILE = "freelm.json"
TEACHER = "teacher_head.weight"
MAX_SHARD_BYTES = 50 * 10**9  # transformers' own default for save_pretrained
LAYOUTS = ("hf", "freelm")  # stock transformers; the FreeLM authors' layout (also loadable by stock transformers)


def export_hf(run_dir: str | Path, out: str | Path, tag: str | None = None, dtype: str | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES, layout: str = "hf") -> Path:
    """Write the run's checkpoint `tag` (default: latest; ZeRO partitions and TP shards joined) to `out` as a
    Hugging Face model directory, in `dtype` (fp32, bf16 or fp16; default: the precision the run trained
    in), in `layout` (see LAYOUTS). Tensors stream from the partition files to the output one at a time, so
    memory stays near the largest tensor plus `ShardedCheckpoint`'s read batch, whatever the model's size.
    Returns `out`."""
    from safetensors.torch import save_file

    from pipeline.checkpoint.consolidate import ShardedCheckpoint
    from pipeline.hf.safetensors_writer import SafetensorsWriter

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: not a training run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if layout not in LAYOUTS:
        raise ConfigError(f"export layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    authors = layout == "freelm"
    if authors and cfg.model.block != "gpt2":
        raise ConfigError(f"{run_dir / 'config.yaml'}: model.block={cfg.model.block!r}; the FreeLM authors' layout "
                          f"(--format freelm) is a GPT-2 model (model.block: gpt2): export this run with --format hf")
    checkpoint = ShardedCheckpoint(run_dir / "checkpoints", cfg.model, tag)
    dtype = dtype or checkpoint.precision
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    block, torch_dtype = cfg.model.block, DTYPES[dtype]

    def converted(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name == TEACHER:
            return {MTC_HEAD: mtc_from_teacher(tensor)} if authors else {}
        return to_hf(block, name, tensor, cfg.model)

    plan = {}  # every Hugging Face tensor's name and shape, from conversions on the meta device
    for name, shape in checkpoint.shapes.items():
        plan.update({hf_name: t.shape for hf_name, t in converted(name, torch.empty(shape, device="meta")).items()})
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    with SafetensorsWriter(out, plan, torch_dtype, max_shard_bytes) as writer:  # the tied LM head is not stored
        tensors = progress(checkpoint.parameters(), total=len(checkpoint.shapes), desc="export", unit="tensor")
        for name, tensor in tensors:
            if name == TEACHER:
                save_file({"weight": tensor.to(torch_dtype).contiguous()}, out / TEACHER_FILE)
            for hf_name, hf_tensor in converted(name, tensor).items():
                writer.write(hf_name, hf_tensor)
    config = hf_config(cfg.model, asdict(tokenizer.special))
    config.dtype = torch_dtype
    if authors:
        setattr(config, TASKS_KEY, "2")  # one binary task: the teacher head
    config.save_pretrained(out)
    tokenizer.save(out)
    meta = {"model": asdict(cfg.model), "dtype": dtype, "layout": layout,
            "source": {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.path.name},
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
