"""Training throughput of our trainer against plain PyTorch loops, measured side by side in the same run.

CPU (fp32, one rank, a 6-layer d384 GPT-2-block model, seq 256, micro-batch 8):
  ours         pipeline.train.trainer.train(), each run in a process of its own: DeepSpeed ZeRO-3
               (ds_configs/zero3.json) and ZeRO-1 (ds_configs/zero1.json) over megatron-core layers, eager and
               with `train.compile` (each block compiled by inductor), and DeepSpeed without ZeRO (stage 0,
               ds_configs/zero0.json: the engine's own cost, no partitioned optimizer); language steps;
               tokens/s from run_dir/metrics.jsonl
  baseline     transformers GPT2LMHeadModel of the same shape (SDPA, fused tanh-GELU, no dropout), torch AdamW
               (foreach) with our optimizer settings, gradient clipping 1.0, a bare loop over random
               micro-batch x seq windows of the same corpus, in a process of its own started beside each run of
               ours; the two take turns step by step (the baseline steps after each of ours; each side waits
               0.1 s before its step, so the other's OpenMP threads have stopped spinning), so a drift of this
               shared machine's speed falls on both alike, and each run's ratio is to its own baseline's steps
  teacher      our trainer's teacher steps (ZeRO-1) against a bare loop of the same FreeLM over the very same
               proposition batches (torch AdamW, clipping), taking turns in the same way: propositions/s
`--rounds` times over (default 3), every row runs once per round, in an order rotated each round; the median
ratio over rounds is the figure, printed with the smallest and largest. Tokens/s is the median step of a run
after warm-up steps. Achieved FLOP/s = tokens/s x training FLOPs per token
(pipeline.model.size; one accounting for both, the shapes being equal), also as a fraction of an fp32 matmul
peak measured in the same run. The CPU time other processes took during the timed runs is reported: figures
taken while it is high are not comparable.

GPU (`--gpu`, CUDA only, as benchmarks/gpu.sh runs it): the shipped 0.3b and 1.3b recipes on one GPU, bf16,
ZeRO-1/2/3 eager and ZeRO-1 compiled, with a GPT-2-style byte-level BPE (46,692 ids): per signal, real tokens/s,
TFLOP/s and MFU against the device's dense bf16 peak, and the peak memory allocated against `freelm plan`'s.

`--rehearse` runs that section's code on CPU with the tiny recipe in fp32 (no memory figures).

Usage: python benchmarks/train_throughput.py [--steps N] [--rounds N] [--data ../shared/data] [--gpu | --rehearse] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from data_throughput import train_gpt2_style, utf8  # this folder's: benchmarks run as scripts
from pipeline.config import Config, load_config
from pipeline.parallel.distributed import free_port
from pipeline.train.optim import param_groups
from pipeline.train.throughput import matmul_flops, peak_flops

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed's ZeRO-3 calls collectives that torch deprecates, and torch warns on every step (here, at import,
# so that the processes the GPU section starts per grid filter them too).
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
T = TypeVar("T")
WARMUP = 3  # steps left out of every median
SETTLE = 0.1  # s each side of a paired run waits before its step (`run_paired`)
SHAPE = {"model.block": "gpt2", "model.n_layers": 6, "model.d_model": 384, "model.n_heads": 6}
SEQ, MICRO, VOCAB, TEACHER_MICRO = 256, 8, 8000, 64
CPU_RUNS = [("ZeRO-3", "zero3.json", False), ("ZeRO-1", "zero1.json", False), ("ZeRO-3 compiled", "zero3.json", True),
            ("ZeRO-1 compiled", "zero1.json", True), ("stage 0 (no ZeRO)", "zero0.json", False)]
GPU_RECIPES = ["0.3b", "1.3b"]
GPU_RUNS = [("ZeRO-1", "zero1_bf16.json", False), ("ZeRO-2", "zero2_bf16.json", False),
            ("ZeRO-3", "zero3_bf16.json", False), ("ZeRO-1 compiled", "zero1_bf16.json", True)]
# `--rehearse`: the GPU section's code on CPU, the tiny recipe in fp32 (no memory figures).
REHEARSAL_RUNS = [("ZeRO-1", "zero1.json", False), ("ZeRO-3", "zero3.json", False),
                  ("ZeRO-1 compiled", "zero1.json", True)]


def cpu_ticks() -> tuple[int, int, float]:
    """Machine-wide busy and total CPU ticks (/proc/stat: user .. steal), and the ticks this process and its
    finished children (the runs of ours) used."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), sum(os.times()[:4]) * os.sysconf("SC_CLK_TCK")


def prepare_data(data: Path, tmp: Path, gpt2_vocab: bool = False) -> None:
    """Tokenizer (sentencepiece, or with `gpt2_vocab` data_throughput's GPT-2-style byte-level BPE), language
    corpus and CoLA teacher propositions."""
    from pipeline.data.corpus import build_corpus
    from pipeline.data.propositions import build_propositions
    from pipeline.data.tokenizer import HFTokenizer, train_sentencepiece

    files = [f for f in sorted((data / "lm" / "gutenberg_nltk").glob("*.txt")) if utf8(f)]
    if gpt2_vocab:
        HFTokenizer(train_gpt2_style(files, tmp / "gpt2")).save(tmp / "tok")
    else:
        train_sentencepiece(files, tmp / "tok", VOCAB)
    build_corpus([str(f) for f in files], tmp / "tok", tmp / "corpus", workers=min(8, os.cpu_count() or 1))
    build_propositions(REPO / "recipes" / "tasks.yaml", "train", tmp / "tok", tmp / "teacher", only=["cola"])


def trainer_config(tmp: Path, name: str, recipe: str | None, overrides: dict) -> Config:
    """A recipe (None: the defaults) pointed at the benchmark's data; no checkpoints or log lines, one MLflow
    store for all runs (metrics.jsonl is kept: the figures come from it)."""
    base = {
        "data.tokenizer": tmp / "tok", "data.corpora": f"[{tmp / 'corpus'}]",
        "data.teacher": tmp / "teacher" / "train", "data.num_workers": 0, "train.run_dir": tmp / name,
        "train.warmup_steps": 2, "train.log_every": 10**6, "train.checkpoints": "false",
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.system_metrics": "false",
    }
    pairs = {**base, **overrides}
    return load_config(REPO / "recipes" / f"{recipe}.yaml" if recipe else None, [f"{k}={v}" for k, v in pairs.items()])


def one_rank_env() -> None:
    """This process as a world of one rank, on a free port (`pipeline.parallel.distributed.init_parallel` joins it)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def run_ours(cfg: Config) -> dict[str, list[dict]]:
    """Our trainer in this process; its metrics rows after warm-up, by the signal each step trained."""
    from pipeline.train.trainer import train

    one_rank_env()
    train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    by_signal: dict[str, list[dict]] = {"language": [], "teacher": []}
    for row in rows:
        signal = "language" if "loss/language" in row else "teacher"
        by_signal[signal].append(row)
    return {signal: found[WARMUP:] for signal, found in by_signal.items()}


def fresh(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a process of its own (spawned), as a user's run starts: no run of ours inherits another's
    memory, allocator settings, compiled graphs or DeepSpeed's process-wide state, nor leaves its own to the
    baseline."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_grid(cfg: Config) -> tuple[dict[str, list[dict]], float]:
    """`run_ours`, and the peak GPU memory allocated, in GiB (run `fresh`, one process per grid)."""
    from pipeline.plan import GIB

    found = run_ours(cfg)
    return found, torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def corpus_batches(prefix: Path, count: int, micro: int, seq: int) -> list[torch.Tensor]:
    """`count` micro-batches of `seq` token ids from random windows of the corpus."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    corpus = IndexedDataset(str(prefix))
    tokens = np.concatenate([corpus[i] for i in range(len(corpus))]).astype(np.int64)
    starts = np.random.default_rng(0).integers(0, len(tokens) - seq, size=(count, micro))
    return [torch.from_numpy(np.stack([tokens[s:s + seq] for s in row])) for row in starts]


def adamw(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    train = cfg.train
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(train.beta1, train.beta2),
                             eps=1e-8, foreach=True)


def hf_model(cfg: Config, padded_vocab: int) -> torch.nn.Module:
    """GPT2LMHeadModel of our run's shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = cfg.model
    config = GPT2Config(
        vocab_size=padded_vocab, n_positions=shape.max_seq_len, n_embd=shape.d_model, n_layer=shape.n_layers,
        n_head=shape.n_heads, layer_norm_epsilon=shape.norm_eps, activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    model.loss_type = "ForCausalLM"  # what transformers falls back to for this class, after a warning
    return model


def plain_step(step: Callable[[Any], torch.Tensor], batch: Any, count: Callable[[Any], int], grad_clip: float,
               model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Items/s of one step of a bare loop, timed as our trainer times a step."""
    start = time.perf_counter()
    loss = step(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # waits for the device, as our trainer's end-of-step metrics all-reduce does
    return count(batch) / (time.perf_counter() - start)


def teacher_batches(cfg: Config, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` teacher micro-batches our trainer's stream yields (same file, seed, grouping)."""
    from pipeline.data.loaders import teacher_loader
    from pipeline.data.tokenizer import load_tokenizer

    data, train = cfg.data, cfg.train
    loader = teacher_loader(data.teacher, data.teacher_seq_len, load_tokenizer(data.tokenizer).special.pad,
                            train.teacher_micro_batch, 0, 1, train.seed, length_window=data.teacher_length_window,
                            grad_accum=train.teacher_grad_accum)
    it = iter(loader)
    return [next(it) for _ in range(count)]


def plain_loop(conn: Connection, signal: str, cfg: Config) -> None:
    """The baseline of `signal`, in a process of its own: the transformers model's language steps, or our FreeLM's
    teacher steps (no DeepSpeed) over the trainer's own first teacher batches. One step each time `conn` asks
    (True), its items/s sent back; False ends it."""
    from pipeline.model.size import measure

    torch.manual_seed(0)
    if signal == "language":
        model = hf_model(cfg, measure(cfg.model, 1, SEQ).padded_vocab_size)
        batches = corpus_batches(Path(cfg.data.corpora[0]), cfg.train.steps, MICRO, SEQ)

        def step(batch: torch.Tensor) -> torch.Tensor:
            return model(input_ids=batch, labels=batch).loss

        def count(batch: torch.Tensor) -> int:
            return batch.numel()
    else:
        from pipeline.model.freelm import FreeLM
        from pipeline.parallel.distributed import init_parallel

        one_rank_env()
        init_parallel(1)
        model = FreeLM(cfg.model).train()
        batches = teacher_batches(cfg, cfg.train.steps)

        def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(batch["tokens"], signal="teacher", lengths=batch["lengths"], labels=batch["labels"]).loss

        def count(batch: dict[str, torch.Tensor]) -> int:
            return len(batch["labels"])
    optimizer = adamw(model, cfg)
    for batch in itertools.cycle(batches):
        if not conn.recv():
            return
        time.sleep(SETTLE)
        conn.send(plain_step(step, batch, count, cfg.train.grad_clip, model, optimizer))


def run_paired(cfg: Config, signal: str) -> tuple[dict[str, list[dict]], list[float]]:
    """`run_ours`, taking turns with `plain_loop` for `signal` in a process of its own: the baseline steps after
    each step of ours, before that step's metrics are logged (so MLflow's thread overlaps our next step, as in a
    run, not the baseline's). Returns ours' metrics rows and the baseline's rates, both after warm-up."""
    from pipeline.train.tracking import Tracker

    context = multiprocessing.get_context("spawn")
    conn, plain_end = context.Pipe()
    plain = context.Process(target=plain_loop, args=(plain_end, signal, cfg), daemon=True)
    plain.start()
    rates: list[float] = []
    log = Tracker.log

    def baseline_then_log(tracker: Tracker, step: int, metrics: dict[str, float]) -> None:
        conn.send(True)
        rates.append(conn.recv())
        time.sleep(SETTLE)
        log(tracker, step, metrics)

    Tracker.log = baseline_then_log
    try:
        return run_ours(cfg), rates[WARMUP:]
    finally:
        Tracker.log = log
        conn.send(False)
        plain.join()


def compare_cpu(tmp: Path, steps: int, rounds: int) -> dict:
    from pipeline.model.size import measure

    threads = torch.get_num_threads()
    shape = {**SHAPE, "model.max_seq_len": SEQ, "model.vocab_size": VOCAB, "data.seq_len": SEQ,
             "train.micro_batch": MICRO, "train.steps": steps, "train.language_steps": steps, "train.teacher_steps": 1}
    configs = {name: trainer_config(tmp, name.replace(" ", "_"), None, {
        **shape, "train.ds_config": REPO / "ds_configs" / ds, "train.compile": str(compiled).lower()})
        for name, ds, compiled in CPU_RUNS}
    cfg = configs["ZeRO-3"]
    size = measure(cfg.model, 1, SEQ)
    teacher_cfg = trainer_config(tmp, "teacher", None, {
        **shape, "train.language_steps": 1, "train.teacher_steps": steps, "train.steps": steps + 1,
        "train.teacher_micro_batch": TEACHER_MICRO, "train.ds_config": REPO / "ds_configs" / "zero1.json"})
    # Propositions per real token over the batches the trainer's timed teacher steps take (the plain loop times
    # the same batches).
    taken = teacher_batches(teacher_cfg, steps)[WARMUP:]
    props_per_token = sum(len(b["labels"]) for b in taken) / sum(int(b["lengths"].sum()) for b in taken)

    busy, total, own = cpu_ticks()
    peak = matmul_flops()
    ours: dict[str, list[float]] = {name: [] for name in configs}
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    hf_rates: list[float] = []
    teacher: dict[str, list[float]] = {"ours": [], "plain": []}
    names = list(configs)
    for r in tqdm(range(rounds), desc="rounds", disable=rounds == 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            found, baseline = fresh(run_paired, configs[name], "language")
            rate = median(found["language"], "throughput/language_tokens_per_s")
            ours[name].append(rate)
            ratios[name].append(rate / statistics.median(baseline))
            hf_rates += baseline
        found, baseline = fresh(run_paired, teacher_cfg, "teacher")
        teacher["ours"].append(median(found["teacher"], "throughput/teacher_tokens_per_s") * props_per_token)
        teacher["plain"].append(statistics.median(baseline))
    busy2, total2, own2 = cpu_ticks()
    others = (busy2 - busy - (own2 - own)) / (total2 - total)
    assert torch.get_num_threads() == threads, "a run changed the torch thread count"

    baseline = statistics.median(hf_rates)
    flops = size.train_flops_per_token(SEQ)
    print(f"\ndevice cpu, fp32; torch threads {threads} (the default, left as is for every run)")
    print(f"shape: gpt2 block, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, "
          f"seq {SEQ}, micro-batch {MICRO}, vocab {VOCAB} padded to {size.padded_vocab_size}; training FLOPs per "
          f"token {flops / 1e6:.1f} M")
    print(f"{rounds} round(s), each runs every row once in a rotated order; {steps} language steps per run, median "
          f"without the first {WARMUP}; every run of ours takes turns step by step with a run of the HF loop, and "
          f"its ratio is to that run's steps (the median over rounds is shown, with the smallest and largest)")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s (fp32 2048^2, this run); other processes took {others:.0%} of the "
          f"machine's CPU time during the timed runs (inductor's compile workers included)\n")
    print(f"{'language steps':<40}{'tokens/s':>10}{'GFLOP/s':>10}{'of peak':>9}{'vs HF':>8}{'range':>14}")
    rows = {f"ours: train(), {name}": statistics.median(rates) for name, rates in ours.items()}
    for (label, rate), found in zip(rows.items(), ratios.values()):
        print(f"{label:<40}{rate:>10,.0f}{rate * flops / 1e9:>10.1f}{rate * flops / peak:>9.1%}"
              f"{statistics.median(found):>8.2f}{f'{min(found):.2f}-{max(found):.2f}':>14}")
    print(f"{'HF GPT2LMHeadModel + AdamW':<40}{baseline:>10,.0f}{baseline * flops / 1e9:>10.1f}{baseline * flops / peak:>9.1%}")
    teacher_ratios = [o / p for o, p in zip(teacher["ours"], teacher["plain"])]
    print(f"\n{'teacher steps (micro-batch ' + str(TEACHER_MICRO) + ', CoLA)':<40}{'props/s':>10}{'vs plain':>10}"
          f"{'range':>14}")
    print(f"{'ours: train(), ZeRO-1':<40}{statistics.median(teacher['ours']):>10,.1f}"
          f"{statistics.median(teacher_ratios):>10.2f}{f'{min(teacher_ratios):.2f}-{max(teacher_ratios):.2f}':>14}")
    print(f"{'plain loop, same FreeLM and batches':<40}{statistics.median(teacher['plain']):>10,.1f}")
    return {"device": "cpu", "threads": threads, "rounds": rounds, "peak_flops": peak, "others_cpu_share": others,
            "language_tokens_per_s": rows | {"HF GPT2LMHeadModel + AdamW": baseline},
            "ratios_vs_hf": {label: statistics.median(found) for label, found in zip(rows, ratios.values())},
            "ratios_vs_hf_per_round": dict(zip(rows, ratios.values())),
            "teacher_props_per_s": {"ours_zero1": statistics.median(teacher["ours"]),
                                    "plain": statistics.median(teacher["plain"])},
            "teacher_ratio_per_round": teacher_ratios}


def gpu_recipes(tmp: Path, steps: int, recipes: list[str], runs: list[tuple[str, str, bool]],
                json_path: str | None) -> dict:
    """The shipped recipes on this GPU (or, rehearsing, on CPU); the figures so far are written to `json_path`
    after every run, so a run cut short keeps them."""
    from pipeline.plan import GIB, plan_run

    cuda = torch.cuda.is_available()
    peak, source = peak_flops(None)
    device = torch.cuda.get_device_name() if cuda else "cpu (rehearsal)"
    print(f"\n{device}; MFU against {peak / 1e12:.2f} TFLOP/s ({source}); "
          f"{steps} steps per run, interactive 1:1, medians without the first {WARMUP} of each signal")
    print(f"{'recipe':<8}{'grid':<17}{'signal':<10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'plan':>7}{'run s':>7}")
    results: list[dict] = []
    summary = {"device": device, "peak_flops": peak, "peak_source": source, "runs": results}
    for recipe in recipes:
        for name, ds, compiled in runs:
            cfg = trainer_config(tmp, f"{recipe}-{ds}-{compiled}", recipe, {
                "train.steps": steps, "train.ds_config": REPO / "ds_configs" / ds,
                "train.compile": str(compiled).lower(), "parallel.tensor_parallel": 1})
            planned = plan_run(cfg, nodes=1, gpus_per_node=1, device="gpu" if cuda else "cpu", advise=False).memory.peak
            start = time.perf_counter()
            try:
                found, used = fresh(run_grid, cfg)
            except Exception as exc:  # one failed grid (out of memory, say) must not cost the others' figures
                results.append({"recipe": recipe, "grid": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(f"{recipe:<8}{name:<17}FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                found, used = {}, float("nan")
            wall = time.perf_counter() - start  # process start, DeepSpeed set-up and compilation included
            for signal, rows in found.items():
                rate, mfu = median(rows, f"throughput/{signal}_tokens_per_s"), median(rows, "throughput/mfu_percent")
                results.append({"recipe": recipe, "grid": name, "signal": signal, "tokens_per_s": rate,
                                "tflops": mfu / 100 * peak / 1e12, "mfu_percent": mfu, "peak_gib": used,
                                "plan_gib": planned / GIB, "run_s": wall})
                print(f"{recipe:<8}{name:<17}{signal:<10}{rate:>11,.0f}{mfu / 100 * peak / 1e12:>9.2f}"
                      f"{mfu:>6.1f}%{used:>10.1f}{planned / GIB:>7.1f}{wall:>7.0f}")
            if json_path:
                write_json(json_path, summary)
    return summary


def write_json(path: str, results: dict) -> None:
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="CPU: times every row runs, in rotated order (default 3)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--gpu", action="store_true", help="the GPU section only (fails without CUDA)")
    parser.add_argument("--rehearse", action="store_true", help="the GPU section's code on CPU, tiny recipe")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    if args.steps < 2 * (WARMUP + 1):
        parser.error(f"--steps must be at least {2 * (WARMUP + 1)}: medians leave out {WARMUP} warm-up steps")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: no CUDA device (torch.cuda.is_available() is False)")
    if not args.gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports deepspeed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_data(Path(args.data), tmp, gpt2_vocab=args.gpu)
        if args.gpu:
            results = gpu_recipes(tmp, args.steps, GPU_RECIPES, GPU_RUNS, args.json)
        elif args.rehearse:
            results = gpu_recipes(tmp, args.steps, ["tiny"], REHEARSAL_RUNS, args.json)
        else:
            results = compare_cpu(tmp, args.steps, args.rounds)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
