"""Zero-shot evaluation of a trained FreeLM, with no fine-tuning.

For every labelled example, the proposition of each candidate label is scored: the teacher head's P(true),
and (the baseline a plain LM would use) the language model's mean log-likelihood of the proposition after
the input, normalised by its likelihood without the input. Each scorer predicts its best candidate.
Reported per task: accuracy (plus F1 and Matthews correlation for two-label tasks), the majority-class
baseline, and the LM-only baseline; and the perplexity of held-out text.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, load_config
from pipeline.data.loaders import right_pad
from pipeline.data.propositions import encode_with_tail, proposition_tail
from pipeline.data.tasks import Proposition, SplitStats, iter_propositions, load_tasks
from pipeline.data.tokenizer import Tokenizer
from pipeline.model.freelm import FreeLM

BATCH = 32


@dataclass
class TaskResult:
    task: str
    n: int
    accuracy: float
    majority: float
    lm_only: float
    f1: float | None = None
    mcc: float | None = None


def binary_f1_mcc(gold: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """F1 of class 1 (the task's second label) and Matthews correlation."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return f1, ((tp * tn - fp * fn) / denominator if denominator else 0.0)


@torch.no_grad()
def score(model: FreeLM, tokenizer: Tokenizer, props: Sequence[Proposition], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """P(true) from the teacher head, and the LM-only score: the mean log-probability of each proposition
    given its input, minus that given only a document boundary (GPT-3's normalisation by the unconditional
    probability), so that a template likelier on its own does not win every example."""
    p_true, lm = [], []
    pad = tokenizer.special.pad
    for start in range(0, len(props), BATCH):
        batch = props[start:start + BATCH]
        inputs = [p.input_text for p in batch]
        teacher = encode_with_tail(tokenizer, inputs, [proposition_tail(p.proposition_text) for p in batch], max_len)
        tokens, lengths = right_pad([ids for ids, _, _ in teacher], pad)
        p_true.append(model(tokens, signal="teacher", lengths=lengths).p_true.numpy())
        plain = encode_with_tail(tokenizer, inputs, [" " + p.proposition_text for p in batch], max_len + 1)
        lm.append(tail_logprob(model, [ids for ids, _, _ in plain], [tail for _, tail, _ in plain], pad))
    texts = sorted({p.proposition_text for p in props})
    alone = tokenizer.encode_batch([" " + text for text in texts])
    boundary = [np.asarray([tokenizer.special.eos, *ids]) for ids in alone]
    prior = dict(zip(texts, tail_logprob(model, boundary, [len(ids) for ids in alone], pad)))
    return np.concatenate(p_true), np.concatenate(lm) - np.array([prior[p.proposition_text] for p in props])


def tail_logprob(model: FreeLM, sequences: Sequence[np.ndarray], tail_lens: Sequence[int], pad: int) -> np.ndarray:
    """Mean log-probability of each sequence's last `tail_len` tokens given the tokens before them."""
    tokens, lengths = right_pad(sequences, pad)
    out = model(tokens[:, :-1], signal="language", targets=tokens[:, 1:])
    positions = torch.arange(tokens.shape[1] - 1)[None, :]
    starts = torch.tensor([len(ids) - tail - 1 for ids, tail in zip(sequences, tail_lens)])[:, None]
    mask = (positions >= starts) & (positions < (lengths - 1)[:, None])
    return (-(out.token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()


def examples(props: Iterator[Proposition], limit: int | None) -> list[list[Proposition]]:
    """Propositions grouped by example (candidates in label order), at most `limit` examples."""
    grouped: list[list[Proposition]] = []
    for prop in props:
        if grouped and grouped[-1][0].example_id == prop.example_id:
            grouped[-1].append(prop)
        elif limit is not None and len(grouped) == limit:
            break
        else:
            grouped.append([prop])
    return grouped


def evaluate_tasks(
    model: FreeLM, tokenizer: Tokenizer, tasks_yaml: str | Path, split: str, max_len: int,
    only: Sequence[str] | None = None, limit: int | None = None,
) -> list[TaskResult]:
    results = []
    for spec in load_tasks(tasks_yaml, only).values():
        if split not in spec.splits:
            continue
        groups = examples(iter_propositions(spec, split, SplitStats(), all_candidates=True), limit)
        flat = [p for group in groups for p in group]
        p_true, lm = score(model, tokenizer, flat, max_len)
        gold = np.array([spec.label_names.index(group[0].gold) for group in groups])
        bounds = np.cumsum([0] + [len(group) for group in groups])
        pred = np.array([np.argmax(p_true[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        lm_pred = np.array([np.argmax(lm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
        result = TaskResult(
            task=spec.name, n=len(groups), accuracy=float(np.mean(pred == gold)),
            majority=float(np.bincount(gold).max() / len(gold)), lm_only=float(np.mean(lm_pred == gold)),
        )
        if len(spec.label_names) == 2:
            result.f1, result.mcc = binary_f1_mcc(gold, pred)
        results.append(result)
    return results


def format_table(results: Sequence[TaskResult]) -> str:
    lines = [f"{'task':<16}{'n':>7}{'FreeLM acc':>12}{'F1':>8}{'MCC':>8}{'LM-only':>10}{'majority':>10}"]
    for r in results:
        extra = "".join(f"{v:>8.3f}" if v is not None else f"{'-':>8}" for v in (r.f1, r.mcc))
        lines.append(f"{r.task:<16}{r.n:>7}{r.accuracy:>12.3f}{extra}{r.lm_only:>10.3f}{r.majority:>10.3f}")
    return "\n".join(lines)


@torch.no_grad()
def perplexity(model: FreeLM, tokenizer: Tokenizer, text_file: str | Path, seq_len: int, max_windows: int = 64) -> float:
    """exp(mean next-token loss) over consecutive `seq_len` windows of a held-out text file."""
    ids = torch.tensor(tokenizer.encode(Path(text_file).read_text(encoding="utf-8", errors="replace")))
    windows = min(max_windows, (len(ids) - 1) // seq_len)
    if windows == 0:
        raise ValueError(f"{text_file}: fewer than {seq_len + 1} tokens")
    chunks = ids[: windows * seq_len + 1]
    tokens = chunks[:-1].view(windows, seq_len)
    targets = chunks[1:].view(windows, seq_len)
    losses = [model(tokens[i:i + 8], signal="language", targets=targets[i:i + 8]).token_loss for i in range(0, windows, 8)]
    return math.exp(torch.cat(losses).mean().item())


def load_trained(run_dir: str | Path) -> tuple[FreeLM, Tokenizer, Config]:
    """A training run's latest checkpoint, any TP degree, as one full model in this process (TP=1)."""
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.parallel.tensor_parallel import load_full_state_dict
    from pipeline.checkpoint.consolidate import consolidate

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    weights = consolidate(run_dir / "checkpoints", cfg.model)
    rows = weights["embed.weight"].shape[0]
    model = FreeLM(dataclasses.replace(cfg.model, vocab_size=rows, vocab_pad_multiple=0))
    load_full_state_dict(model, weights, None)
    return model.eval(), load_tokenizer(cfg.data.tokenizer), cfg


def evaluate_run(
    run_dir: str | Path, tasks_yaml: str | Path, split: str, only: Sequence[str] | None = None,
    limit: int | None = None, heldout: str | Path | None = None,
) -> tuple[list[TaskResult], float | None]:
    """A training run's latest checkpoint scored on `split` in this process (one rank), and the perplexity of
    `heldout` when given."""
    from pipeline.parallel.distributed import destroy_parallel, init_parallel

    init_parallel(1)
    try:
        model, tokenizer, cfg = load_trained(run_dir)
        results = evaluate_tasks(model, tokenizer, tasks_yaml, split, cfg.data.seq_len, only, limit)
        ppl = perplexity(model, tokenizer, heldout, cfg.data.seq_len) if heldout else None
    finally:
        destroy_parallel()
    return results, ppl


def log_to_mlflow(run_dir: str | Path, split: str, results: Sequence[TaskResult], ppl: float | None) -> str:
    """Add the results to the training run's MLflow run (from run_dir/mlflow_run.json) as `eval/<split>/...`
    metrics at the checkpoint's step; returns the run id."""
    import json

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint.io import latest_tag

    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    step = int(latest_tag(run_dir / "checkpoints").split("_")[-1])
    now = int(time.time() * 1000)
    values = {f"eval/{split}/perplexity": ppl} if ppl is not None else {}
    for r in results:
        for key in ("accuracy", "majority", "lm_only", "f1", "mcc"):
            if getattr(r, key) is not None:
                values[f"eval/{split}/{r.task}/{key}"] = getattr(r, key)
    metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
    MlflowClient(saved["tracking_uri"]).log_batch(saved["run_id"], metrics=metrics)
    return saved["run_id"]
