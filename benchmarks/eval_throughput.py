"""Zero-shot scoring throughput of `freelm eval` against a plain transformers loop, in one run on one device.

  ours      pipeline.eval.scoring.score_propositions (the path `freelm eval` runs) on the checkpoint loaded by
            pipeline.eval.load.load_trained: propositions sorted by length, at most B rows per batch, LM head
            and cross-entropy only at each proposition's tail
  baseline  the same checkpoint exported (`freelm export-hf`) and loaded with pipeline.hf.export.from_pretrained
            (GPT2LMHeadModel + teacher head): batches of B propositions in file order; teacher P(true) from
            `p_true`; the LM-only score from the full logits (log-softmax over the vocabulary at every
            position), and each distinct proposition after a bare eos (GPT-3's normalisation), as ours

Both score the same propositions (every candidate of --limit SST-2 and RTE dev examples) on the same device
in the same precision (fp32 on CPU; on GPU the training precision, bf16), tokenization included. Examples/s
is the best of --repeats timed passes after a warm-up, the two paths alternating. The scores of the two are
compared: they differ only by float rounding and, for the LM score, by the vocabulary padding rows that our
softmax includes and the exported model drops.

The checkpoint has random weights: `freelm train` runs 1 step on one process from scratch, with a byte-level
BPE tokenizer trained on ../shared/data/lm. Shapes: `--shape small` (default; GPT-2 block, 6 layers, d_model
384, vocab 8,000) or `--shape 0.3b` (GPT-2 medium, 355M, vocab 50,257: build and run it under the memory lock,
`flock /tmp/freelm-bigmem.lock python benchmarks/eval_throughput.py --shape 0.3b`). Data and checkpoint are
kept in --work and reused by the next run.

Usage: python benchmarks/eval_throughput.py [--shape small|0.3b] [--limit 100] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
LM_TEXT = REPO.parent / "shared" / "data" / "lm"
NOT_UTF8 = ("chesterton-ball.txt", "shakespeare-caesar.txt")
SHAPES = {
    "small": ({"model.block": "gpt2", "model.n_layers": 6, "model.d_model": 384, "model.n_heads": 6}, 8000),
    "0.3b": ({"model.preset": "0.3b"}, 50257),
}
TASKS, SEQ = ["sst2", "rte"], 256


def freelm(*args: str, env: dict | None = None) -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"freelm {' '.join(args[:2])} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")


def prepare(work: Path, shape: str, device: torch.device) -> Path:
    """Tokenizer, both data streams, a 1-step checkpoint and its export, under `work` (kept when present)."""
    from pipeline.parallel.distributed import free_port

    run_dir, model, vocab = work / "run", *SHAPES[shape]
    if (run_dir / "checkpoints" / "latest").exists() and (work / "hf" / "freelm.json").exists():
        return run_dir
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    print(f"preparing {work}: tokenizer, data, 1 training step, export", flush=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train(sorted(str(f) for f in LM_TEXT.rglob("*.txt") if f.name not in NOT_UTF8), vocab_size=vocab,
              special_tokens=["<|endoftext|>"], show_progress=False)
    GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(str(work / "bpe"))
    freelm("tokenizer", "import", "--hf", str(work / "bpe"), "--out", str(work / "tok"))
    books = [str(LM_TEXT / "gutenberg_nltk" / name) for name in ("austen-persuasion.txt", "chesterton-brown.txt")]
    freelm("data", "corpus", "--input", *books, "--tokenizer", str(work / "tok"), "--out", str(work / "lm"))
    freelm("data", "tasks", "--config", str(REPO / "recipes" / "tasks.yaml"), "--split", "train", "--only", "rte",
           "--tokenizer", str(work / "tok"), "--out", str(work / "teacher"), "--max-len", str(SEQ))
    ds_config = "zero3_bf16.json" if device.type == "cuda" else "zero3.json"
    overrides = {**model, "data.tokenizer": work / "tok", "data.corpora": f"[{work / 'lm'}]",
                 "data.teacher": work / "teacher" / "train", "data.seq_len": SEQ, "data.num_workers": 0,
                 "train.run_dir": run_dir, "train.ds_config": REPO / "ds_configs" / ds_config, "train.steps": 1,
                 "train.micro_batch": 1, "train.teacher_micro_batch": 2, "train.warmup_steps": 1,
                 "tracking.enabled": "false"}
    freelm("train", *[f"{key}={value}" for key, value in overrides.items()],
           env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(free_port())})
    freelm("export-hf", "--checkpoint", str(run_dir), "--out", str(work / "hf"))
    return run_dir


def propositions(limit: int) -> list:
    from pipeline.data.tasks import SplitStats, iter_propositions, load_tasks
    from pipeline.eval.run import examples

    specs = load_tasks(REPO / "recipes" / "tasks.yaml", TASKS).values()
    return [p for spec in specs for group in examples(iter_propositions(spec, "dev", SplitStats(), all_candidates=True),
                                                      limit) for p in group]


@torch.inference_mode()
def hf_tail_logprob(lm, sequences: list[np.ndarray], tails: list[int], pad: int, device: torch.device) -> np.ndarray:
    """Mean log-probability of each sequence's last `tail` tokens, from the full logits."""
    from pipeline.data.loaders import right_pad

    tokens, lengths = right_pad(sequences, pad)
    tokens, lengths = tokens.to(device), lengths.to(device)
    mask = (torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]).long()
    logits = lm(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1]).logits.float()
    logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    positions = torch.arange(tokens.shape[1] - 1, device=device)[None]
    starts = torch.tensor([len(ids) - tail - 1 for ids, tail in zip(sequences, tails)], device=device)[:, None]
    keep = (positions >= starts) & (positions < (lengths - 1)[:, None])
    return ((logprobs * keep).sum(1) / keep.sum(1)).cpu().numpy()


@torch.inference_mode()
def hf_scores(exported, props: list, max_len: int, batch: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: P(true) and the normalised LM-only score, `batch` propositions at a time."""
    from pipeline.data.loaders import right_pad
    from pipeline.data.propositions import encode_with_tail, proposition_tail

    tok = exported.tokenizer
    pad = tok.special.pad
    p_true, lm = [], []
    for start in range(0, len(props), batch):
        chunk = props[start:start + batch]
        inputs = [p.input_text for p in chunk]
        teacher = encode_with_tail(tok, inputs, [proposition_tail(p.proposition_text) for p in chunk], max_len)
        tokens, lengths = right_pad([ids for ids, _, _ in teacher], pad)
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        p_true.append(exported.p_true(tokens.to(device), mask.to(device)).cpu().numpy())
        plain = encode_with_tail(tok, inputs, [" " + p.proposition_text for p in chunk], max_len + 1)
        lm.append(hf_tail_logprob(exported.lm, [ids for ids, _, _ in plain], [t for _, t, _ in plain], pad, device))
    texts = sorted({p.proposition_text for p in props})
    alone = tok.encode_batch([" " + text for text in texts])
    boundary = [np.asarray([tok.special.eos, *ids]) for ids in alone]
    prior = np.concatenate([hf_tail_logprob(exported.lm, boundary[i:i + batch], [len(a) for a in alone[i:i + batch]],
                                            pad, device) for i in range(0, len(texts), batch)])
    prior = dict(zip(texts, prior))
    return np.concatenate(p_true), np.concatenate(lm) - np.array([prior[p.proposition_text] for p in props])


def timed(fn, *args) -> tuple[float, tuple]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--limit", type=int, default=100, help="dev examples per task (default 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="propositions per batch, both paths (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each path (default 2)")
    parser.add_argument("--work", type=Path, default=None, help="default runs/bench-eval-SHAPE")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    work = (args.work or REPO / "runs" / f"bench-eval-{args.shape}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = prepare(work, args.shape, device)

    from pipeline.eval.load import load_trained
    from pipeline.eval.scoring import Batching, Placement, score_propositions
    from pipeline.hf.export import from_pretrained
    from pipeline.parallel.distributed import destroy_parallel, free_port, init_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(free_port()))
    init_parallel(1)
    model, tokenizer, cfg = load_trained(run_dir, 1, device)
    dtype = model.embed.weight.dtype
    exported = from_pretrained(work / "hf", dtype=dtype).to(device)
    props = propositions(args.limit)
    n = len({(p.task, p.example_id) for p in props})
    placement, batching = Placement(device, progress=False), Batching(tokens=10**9, rows=args.batch_size)

    def ours(chosen: list) -> tuple:
        return score_propositions(model, tokenizer, chosen, SEQ, placement, batching)

    def baseline(chosen: list) -> tuple:
        return hf_scores(exported, chosen, SEQ, args.batch_size, device)

    ours(props[:16]), baseline(props[:16])  # warm-up
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    scores: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, fn in (("baseline", baseline), ("ours", ours)):
            seconds, scores[name] = timed(fn, props)
            times[name].append(seconds)
    destroy_parallel()

    params = sum(p.numel() for p in model.parameters())
    print(f"\ndevice {device}, {str(dtype).removeprefix('torch.')}; torch threads {torch.get_num_threads()}; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after (2 cores: above ~2 means a shared machine)")
    print(f"model: {args.shape} shape, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {params:,} params, "
          f"vocab {cfg.model.vocab_size}; {n} examples ({', '.join(TASKS)} dev), {len(props)} propositions, "
          f"batch size {args.batch_size}, max length {SEQ}")
    (p_ours, lm_ours), (p_base, lm_base) = scores["ours"], scores["baseline"]
    print(f"max |difference| ours vs baseline: P(true) {np.abs(p_ours - p_base).max():.2e}, "
          f"LM-only score {np.abs(lm_ours - lm_base).max():.2e}\n")
    rates = {name: n / min(seconds) for name, seconds in times.items()}
    print(f"{'':<46}{'examples/s':>12}{'best of':>9}")
    print(f"{'ours: freelm eval scoring':<46}{rates['ours']:>12.2f}{len(times['ours']):>9}")
    print(f"{'baseline: transformers loop, full logits':<46}{rates['baseline']:>12.2f}{len(times['baseline']):>9}")
    print(f"{'ratio ours / baseline':<46}{rates['ours'] / rates['baseline']:>12.2f}")


if __name__ == "__main__":
    main()
