"""Peak FLOP/s of a device, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, FLOP/s, matched against
# torch.cuda.get_device_name() in this order (a variant before its family). None: no datasheet figure
# (AWS's A10G is not an A10), so the peak is measured.
GPU_PEAKS: list[tuple[str, float | None]] = [
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", None), ("A10", 125e12),
    ("V100", 125e12),
]


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


def gpu_peak(name: str) -> float | None:
    for key, flops in GPU_PEAKS:
        if key in name:
            return flops
    return None


def peak_flops(configured_tflops: float | None) -> tuple[float, str]:
    """Per-device peak for MFU and where it came from: the recipe, a known GPU, or a measured matmul.

    A CPU's peak is measured by every rank at once (the load training puts on the machine) after a barrier,
    and the best rank's figure is taken: a probe that ran while another process held the cores would
    otherwise understate the peak, and MFU would read above 100%."""
    if configured_tflops:
        return configured_tflops * 1e12, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if (flops := gpu_peak(name)) is not None:
            return flops, f"{name} dense bf16 peak"
        return matmul_flops(8192, dtype=torch.bfloat16), f"{name}: measured bf16 matmul"
    if dist.is_initialized():
        dist.barrier()
    measured = torch.tensor(matmul_flops(repeats=10), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    return float(measured), f"measured fp32 matmul on {torch.get_num_threads()} CPU threads, best of all ranks"
