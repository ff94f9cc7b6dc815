"""A one-process FreeLM demo: the tiny model learns a synthetic language and a synthetic teacher task,
alternating one language step and one teacher step (the paper's interactive schedule)."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.model.freelm import FreeLM
from pipeline.parallel.distributed import destroy_parallel, init_parallel


def synthetic_batch(vocab: int, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Arithmetic sequences modulo the vocab: predictable from two tokens on."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(seq + 1)) % vocab


def run_demo(steps: int = 40, seed: int = 0) -> None:
    cfg = load_config(overrides=["model.preset=tiny", "model.vocab_size=64"])
    init_parallel(tensor_parallel=1)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = FreeLM(cfg.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(steps):
            seqs = synthetic_batch(cfg.model.vocab_size, 16, 32, generator)
            if step % 2 == 0:
                out = model(seqs[:, :-1], signal="language", targets=seqs[:, 1:])
            else:
                # Proposition: "the sequence continues correctly"; half the rows get a corrupted last token.
                labels = torch.randint(0, 2, (16,), generator=generator)
                seqs[:, -1] = torch.where(labels == 1, seqs[:, -1], (seqs[:, -1] + 7) % cfg.model.vocab_size)
                lengths = torch.full((16,), seqs.shape[1])
                out = model(seqs, signal="teacher", lengths=lengths, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            if step % 10 in (0, 1) or step >= steps - 2:
                signal = "language" if step % 2 == 0 else "teacher"
                print(f"step {step:3d}  loss/{signal:<8} {out.loss.item():.4f}")
    finally:
        destroy_parallel()
