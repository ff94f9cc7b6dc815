"""The fused, chunked LM loss against the loss it replaced (the LM head's logits for the whole micro-batch, then
megatron-core's vocab-parallel cross-entropy in fp32), side by side in the same run: peak memory and time of
forward + backward at GPT-2's vocabulary.

Each variant runs in a fresh process; peak memory is that process's peak resident set above what it held
before the first loss (CPU), or the peak allocated above the inputs (GPU). Time is the median of the repeats
after one warm-up.

Usage: python benchmarks/lm_loss.py [--positions 4096] [--d-model 1024] [--vocab 50304] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def measure(variant: str, positions: int, d_model: int, vocab: int, repeats: int) -> dict:
    """One variant in this process: peak memory above the inputs and the median time of forward + backward."""
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from pipeline.model.lm_loss import linear_cross_entropy
    from pipeline.parallel.distributed import free_port, init_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_parallel(1)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    h = torch.randn(positions, d_model, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, d_model, device=device, dtype=dtype) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (positions,), device=device)
    weights = torch.full((positions,), 1 / positions, device=device)
    loss_fn = {
        "fused": lambda: linear_cross_entropy(h, weight, targets, weights).loss,
        "whole-batch logits": lambda: vocab_parallel_cross_entropy(F.linear(h, weight).float(), targets).mean(),
    }[variant]

    def step() -> None:
        loss_fn().backward()
        h.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()

    # CPU: the process's peak resident set so far (imports, inputs); it only grows. GPU: allocated now.
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "peak_mib": (peak - base) / 2**20, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=4096, help="tokens per micro-batch (default 4096)")
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304, help="GPT-2's, padded (default 50304)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set for the child processes
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.positions, args.d_model, args.vocab, args.repeats)))
        return
    rows = []
    for variant in ("whole-batch logits", "fused"):
        cmd = [sys.executable, __file__, "--variant", variant, "--positions", str(args.positions), "--d-model",
               str(args.d_model), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(f"LM loss forward + backward: {args.positions} positions, d_model {args.d_model}, vocab {args.vocab}, "
          f"{first['device']} {first['dtype']}, median of {args.repeats}")
    print(f"{'':<22}{'peak MiB':>10}{'seconds':>10}")
    for row in rows:
        print(f"{row['variant']:<22}{row['peak_mib']:>10,.0f}{row['seconds']:>10.3f}")
    print(f"{'fused / whole-batch':<22}{rows[1]['peak_mib'] / rows[0]['peak_mib']:>10.2f}"
          f"{rows[1]['seconds'] / rows[0]['seconds']:>10.2f}")


if __name__ == "__main__":
    main()
