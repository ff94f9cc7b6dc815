"""Peak FLOP/s of a device, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best achieved FLOP/s of an n x n matmul on this process's device: the practical ceiling on CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(configured_tflops: float | None) -> tuple[float, str]:
    """Per-device peak for MFU and where it came from: the recipe, a known GPU, or a measured CPU matmul."""
    if configured_tflops:
        return configured_tflops * 1e12, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAKS.items():
            if key in name:
                return flops, f"{name} dense bf16 peak"
        return matmul_flops(8192, dtype=torch.bfloat16), f"{name}: measured bf16 matmul"
    return matmul_flops(), f"measured fp32 matmul on {torch.get_num_threads()} CPU threads"
