"""Measured memory per rank against `freelm plan`, for one model at DP = 1, 2, 4 under ZeRO-1, 2 and 3.

The model is the 0.3b preset (GPT-2 medium, vocab from a GPT-2-style BPE of 50,260 ids) at a short
sequence. Each configuration trains a few steps of the real trainer (`freelm train`'s code path, launched as
ranks joined by gloo on CPU or NCCL on GPU, both signals, checkpoint at the end) and reports per rank:
  measured  CPU: peak resident set (VmHWM from /proc) minus the resident set after imports and process-group
            start (the baseline, printed beside it); GPU: torch.cuda.max_memory_allocated
  plan      pipeline.plan's peak for the same recipe on this grid (without the GPU runtime, which torch's counter
            does not see either)
  ideal     model states as the ZeRO paper counts them: params + grads + Adam (fp32: 4 + 4 + 8 bytes per
            parameter, bf16: 2 + 2 + 12), each term divided by DP where the stage partitions it
  states    the plan's model-state share (params + grads + optimizer as DeepSpeed allocates them)
Target: measured within 1.3x of the plan, and ZeRO-3's model states falling as 1/DP.
A configuration whose planned memory over all its ranks exceeds what the machine has free is skipped.

Usage: python benchmarks/memory.py [--seq 64] [--steps 2] [--dp 1,2,4] [--stages 1,2,3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from distributed import run_ranks  # noqa: E402
from realsize import prepare_gpt2_data  # noqa: E402

GIB = 1024**3


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def rank_main(overrides: list[str], out: str) -> None:
    """One rank: baseline after imports and process-group start, then the trainer, then the peaks."""
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.parallel.distributed import init_parallel
    from pipeline.train.trainer import train

    cfg = load_config(None, overrides)
    init_parallel(cfg.parallel.tensor_parallel)
    baseline = proc_status("VmRSS")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(cfg)
    row = {"rank": int(os.environ["RANK"]), "baseline": baseline, "peak_rss": proc_status("VmHWM"),
           "seconds": time.perf_counter() - start}
    if torch.cuda.is_available():
        row["peak_cuda"] = torch.cuda.max_memory_allocated()
    Path(out, f"rank{row['rank']}.json").write_text(json.dumps(row))
    del dist


def ideal_states(psi: int, dp: int, stage: int, precision: str) -> float:
    weight, grad, adam = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    return psi * (weight / (dp if stage == 3 else 1) + grad / (dp if stage >= 2 else 1) + adam / dp)


def ds_config(stage: int, precision: str, out: Path) -> Path:
    """The shipped config of that stage and precision, as a user would pick it."""
    name = {("fp32", 3): "zero3.json", ("bf16", 3): "zero3_bf16.json", ("bf16", 1): "zero1_bf16.json",
            ("bf16", 2): "zero2_bf16.json"}.get((precision, stage))
    if name is not None:
        return REPO / "ds_configs" / name
    base = json.loads((REPO / "ds_configs" / f"zero{stage}_bf16.json").read_text())
    base.pop("bf16")
    path = out / f"zero{stage}_{precision}.json"
    path.write_text(json.dumps(base))
    return path


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dp", default="1,2,4")
    parser.add_argument("--stages", default="3,2,1")
    parser.add_argument("--out", default=None, help="keep the runs and write results.json here")
    args = parser.parse_args()
    from pipeline.config import load_config
    from pipeline.plan import plan_run

    gpu = torch.cuda.is_available()
    precision = "bf16" if gpu else "fp32"
    root = Path(args.out or tempfile.mkdtemp(prefix="freelm-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if not (data / "tok").exists():
        print("preparing a GPT-2 BPE tokenizer and both streams ...", flush=True)
        prepare_gpt2_data(data)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    rows = []
    header = (f"{'stage':>5} {'DP':>3} {'rank':>4} {'measured':>9} {'baseline':>9} {'plan':>8} {'ratio':>6} "
              f"{'states':>8} {'ideal':>8} {'s/run':>6}")
    print(f"0.3b preset, seq {args.seq}, micro-batch 1, {precision}, {args.steps} steps + a checkpoint; GiB per rank")
    print(header, flush=True)
    for stage in [int(s) for s in args.stages.split(",")]:
        for dp in [int(d) for d in args.dp.split(",")]:
            run = root / f"z{stage}-dp{dp}"
            overrides = [
                "model.preset=0.3b", "model.dropout=0.0", f"data.tokenizer={data / 'tok'}",
                f"data.corpora=[{data / 'lm'}]", f"data.teacher={data / 'teacher' / 'train'}",
                f"data.seq_len={args.seq}", "data.num_workers=0", f"train.run_dir={run}",
                f"train.ds_config={ds_config(stage, precision, root)}", f"train.steps={args.steps}",
                "train.micro_batch=1", "train.teacher_micro_batch=1", "train.warmup_steps=1",
                "train.save_every=1000", "tracking.enabled=false",
            ]
            cfg = load_config(None, overrides)
            plan = plan_run(cfg, "", 1, dp, 80.0, device="gpu" if gpu else "cpu")
            planned = plan.memory.peak - plan.memory.runtime
            states = plan.memory.params + plan.memory.grads + plan.memory.optimizer
            if not gpu and planned * dp + 0.6 * GIB * dp > available_bytes():
                print(f"{stage:>5} {dp:>3}  skipped: plans {planned * dp / GIB:.1f} GiB over its ranks, "
                      f"{available_bytes() / GIB:.1f} GiB free", flush=True)
                continue
            (run / "peaks").mkdir(parents=True, exist_ok=True)
            run_ranks(rank_main, dp, overrides, str(run / "peaks"))
            ideal = ideal_states(plan.params_per_device, dp, stage, precision)
            for path in sorted((run / "peaks").glob("rank*.json")):
                r = json.loads(path.read_text())
                measured = r["peak_cuda"] if gpu else r["peak_rss"] - r["baseline"]
                row = {"stage": stage, "dp": dp, **r, "measured": measured, "plan": planned, "ratio": measured / planned,
                       "plan_states": states, "ideal_states": ideal}
                rows.append(row)
                print(f"{stage:>5} {dp:>3} {r['rank']:>4} {measured / GIB:>9.2f} {r['baseline'] / GIB:>9.2f} "
                      f"{planned / GIB:>8.2f} {measured / planned:>6.2f} {states / GIB:>8.2f} {ideal / GIB:>8.2f} "
                      f"{r['seconds']:>6.0f}", flush=True)
            if args.out is None:
                import shutil

                shutil.rmtree(run, ignore_errors=True)
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"-> {root / 'results.json'}")


if __name__ == "__main__":
    main()
