"""Training throughput of our trainer against a plain PyTorch loop over Hugging Face GPT-2, measured in the same run.

  matmul peak  pipeline.train.throughput.matmul_flops(): best fp32 2048 x 2048 matmul on this device
  ours         pipeline.train.trainer.train() in one process: DeepSpeed ZeRO-3 (ds_configs/zero3.json, fp32)
               over megatron-core layers, language steps only; tokens/s from run_dir/metrics.jsonl
  baseline     transformers GPT2LMHeadModel of the same shape (SDPA, fused tanh-GELU, no dropout), torch AdamW
               (foreach) with our optimizer settings, gradient clipping 1.0, a bare loop over random
               micro-batch x seq windows of the same corpus

Tokens/s is the median step after warm-up steps; the baseline runs half its steps before ours and half after,
so that a slow drift of a shared machine affects both alike. Achieved FLOP/s = tokens/s x training FLOPs per
token (pipeline.model.size; one accounting for both, the shapes being equal), also as a fraction of the matmul
peak. Torch threads are left at their default for both. The CPU time other processes took during the timed runs is
reported: on a shared machine, figures taken while it is high are not comparable.
With a GPU, our trainer also runs the 0.3b and 1.3b presets in bf16 (ds_configs/zero3_bf16.json), against
the GPU's dense bf16 peak (pipeline.train.throughput.peak_flops).

Usage: python benchmarks/train_throughput.py [--steps N] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, load_config
from pipeline.train.optim import param_groups
from pipeline.train.throughput import matmul_flops, peak_flops

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3  # steps left out of every median
SHAPE = {"model.block": "gpt2", "model.n_layers": 6, "model.d_model": 384, "model.n_heads": 6}
SEQ, MICRO, VOCAB = 256, 8, 8000
GPU_RUNS = [("0.3b", 1024, 8), ("1.3b", 2048, 4)]  # preset, seq, micro-batch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_ticks() -> tuple[int, int, float]:
    """Machine-wide busy and total CPU ticks (/proc/stat: user .. steal), and the ticks this process used."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), sum(os.times()[:2]) * os.sysconf("SC_CLK_TCK")


def prepare_data(data: Path, tmp: Path) -> None:
    """Tokenizer, language corpus and CoLA teacher propositions (the teacher stream is built, never stepped)."""
    from pipeline.data.corpus import build_corpus
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import train_sentencepiece

    files = sorted((data / "lm" / "gutenberg_nltk").glob("*.txt"))
    train_sentencepiece(files, tmp / "tok", VOCAB)
    build_corpus([str(f) for f in files], tmp / "tok", tmp / "corpus", workers=2)
    build_propositions(REPO / "recipes" / "tasks.yaml", "train", tmp / "tok", tmp / "teacher", only=["cola"])


def trainer_config(tmp: Path, name: str, model: dict, seq: int, micro: int, steps: int, ds_config: str) -> Config:
    overrides = {
        **model, "data.tokenizer": tmp / "tok", "data.corpora": f"[{tmp / 'corpus'}]",
        "data.teacher": tmp / "teacher" / "train", "data.seq_len": seq, "data.num_workers": 0,
        "train.run_dir": tmp / name, "train.ds_config": REPO / "ds_configs" / ds_config, "train.steps": steps,
        "train.language_steps": steps, "train.teacher_steps": 1, "train.micro_batch": micro,
        "train.warmup_steps": 2, "train.log_every": 10**6, "train.save_every": 10**6,
    }
    return load_config(None, [f"{key}={value}" for key, value in overrides.items()])


def run_ours(cfg: Config) -> float:
    """Median tokens/s of our trainer's steps after warm-up, read from run_dir/metrics.jsonl."""
    from pipeline.train.trainer import train

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    train(cfg)
    lines = (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)["throughput/tokens_per_s"] for line in lines[WARMUP:])


def corpus_batches(prefix: Path, count: int, micro: int, seq: int) -> list[torch.Tensor]:
    """`count` micro-batches of `seq` token ids from random windows of the corpus."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = IndexedDataset(str(prefix))
    tokens = np.concatenate([corpus[i] for i in range(len(corpus))]).astype(np.int64)
    starts = np.random.default_rng(0).integers(0, len(tokens) - seq, size=(count, micro))
    return [torch.from_numpy(np.stack([tokens[s:s + seq] for s in row])) for row in starts]


def hf_setup(cfg: Config, padded_vocab: int, device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """GPT2LMHeadModel of our run's shape and torch AdamW (foreach) with our run's optimizer settings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape, train = cfg.model, cfg.train
    config = GPT2Config(
        vocab_size=padded_vocab, n_positions=shape.max_seq_len, n_embd=shape.d_model, n_layer=shape.n_layers,
        n_head=shape.n_heads, layer_norm_epsilon=shape.norm_eps, activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device).train()
    model.loss_type = "ForCausalLM"  # what transformers falls back to for this class, after a warning
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr,
                                  betas=(train.beta1, train.beta2), eps=1e-8, foreach=True)
    return model, optimizer


def hf_rates(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], device: str,
             grad_clip: float) -> list[float]:
    """Tokens/s of each step of a bare training loop after warm-up, timed as our trainer times a step."""
    rates = []
    for batch in batches:
        start = time.perf_counter()
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device, as our trainer's end-of-step metrics all-reduce does
        rates.append(batch.numel() / (time.perf_counter() - start))
    return rates[WARMUP:]


def compare(tmp: Path, steps: int, device: str) -> None:
    from pipeline.model.size import measure

    threads = torch.get_num_threads()
    cfg = trainer_config(tmp, "ours", {**SHAPE, "model.max_seq_len": SEQ, "model.vocab_size": VOCAB},
                         SEQ, MICRO, steps, "zero3.json")
    size = measure(cfg.model, 1, SEQ)
    model, optimizer = hf_setup(cfg, size.padded_vocab_size, device)
    batches = corpus_batches(tmp / "corpus", steps, MICRO, SEQ)
    half = steps // 2
    busy, total, own = cpu_ticks()
    peak = matmul_flops()
    hf = hf_rates(model, optimizer, batches[:half], device, cfg.train.grad_clip)  # the baseline brackets ours
    ours = run_ours(cfg)
    hf = statistics.median(hf + hf_rates(model, optimizer, batches[half:], device, cfg.train.grad_clip))
    busy2, total2, own2 = cpu_ticks()
    others = (busy2 - busy - (own2 - own)) / (total2 - total)
    assert torch.get_num_threads() == threads, "a run changed the torch thread count"

    flops = size.train_flops_per_token(SEQ)
    hf_params = sum(p.numel() for p in model.parameters())
    print(f"\ndevice {device}, fp32; torch threads {threads} (the default, left as is for both runs)")
    print(f"shape: gpt2 block, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, "
          f"seq {SEQ}, micro-batch {MICRO}, vocab {VOCAB} padded to {size.padded_vocab_size}")
    print(f"params: ours {size.total_params:,}, HF {hf_params:,}; training FLOPs per token {flops / 1e6:.1f} M")
    print(f"{steps} language steps each, median without warm-up: ours steps {WARMUP + 1}-{steps}; HF {half} steps "
          f"before ours and {steps - half} after, less the first {WARMUP} of each")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s (fp32 2048^2, measured in this run); other processes took "
          f"{others:.0%} of the machine's CPU time during the timed runs\n")
    print(f"{'':<38}{'tokens/s':>10}{'GFLOP/s':>10}{'of peak':>9}")
    for name, rate in (("ours: train(), ZeRO-3, 1 process", ours), ("HF GPT2LMHeadModel + AdamW loop", hf)):
        print(f"{name:<38}{rate:>10,.0f}{rate * flops / 1e9:>10.1f}{rate * flops / peak:>9.1%}")
    print(f"{'ratio ours / HF':<38}{ours / hf:>10.2f}")


def gpu_presets(tmp: Path, steps: int) -> None:
    """Our trainer on the real presets in bf16; only ever called when CUDA is available."""
    from pipeline.model.size import measure

    peak, source = peak_flops(None)
    print(f"\nGPU presets, bf16 (zero3_bf16.json), MFU against {peak / 1e12:.0f} TFLOP/s ({source})")
    print(f"{'preset':<8}{'seq':>6}{'micro':>7}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}")
    for preset, seq, micro in GPU_RUNS:
        cfg = trainer_config(tmp, preset, {"model.preset": preset}, seq, micro, steps, "zero3_bf16.json")
        rate = run_ours(cfg)
        achieved = rate * measure(cfg.model, 1, seq).train_flops_per_token(seq)
        print(f"{preset:<8}{seq:>6}{micro:>7}{rate:>11,.0f}{achieved / 1e12:>9.1f}{achieved / peak:>7.1%}")
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    if args.steps < 2 * (WARMUP + 1):
        parser.error(f"--steps must be at least {2 * (WARMUP + 1)}: the baseline runs in two halves with warm-up")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports deepspeed
    # DeepSpeed's ZeRO-3 calls collectives that torch deprecates, and torch warns on every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_data(Path(args.data), tmp)
        compare(tmp, args.steps, "cuda" if cuda else "cpu")
        if cuda:
            gpu_presets(tmp, args.steps)


if __name__ == "__main__":
    main()
