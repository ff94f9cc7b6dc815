"""Scoring with a FreeLM: propositions (the teacher head's P(true), and the LM-only score), and perplexity.

Every request is an `Item`: the tokens the model reads, and where its answer is read from. A teacher item
is read at its last token (teacher head); an LM item from `start` on, one position per target token (LM head
and vocab-parallel cross-entropy there only: the full-vocab logits of the other positions are never made).
Items are sorted by length and cut into batches under a token budget; batch j runs on data-parallel rank
j mod DP, and the results are summed over the data-parallel group, so every rank ends with all of them, in
the order of the items, whatever the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipeline.data.loaders import right_pad
from pipeline.data.propositions import proposition_tail, truncate
from pipeline.data.tasks import Proposition
from pipeline.data.tokenizer import Tokenizer
from pipeline.model.freelm import FreeLM
from pipeline.progress import progress


@dataclass(frozen=True)
class Item:
    """`tokens`: the model's input. `targets` None: a teacher item, read at the last token. Otherwise an LM
    item: position `start + i` predicts `targets[i]`; its value is the mean log-probability of the targets."""

    tokens: np.ndarray
    start: int = 0
    targets: np.ndarray | None = None


@dataclass(frozen=True)
class Placement:
    """Where scoring runs: the device, this rank's place among the data-parallel ranks (the group results
    are summed over; None with one rank), and whether this rank draws the progress bar."""

    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: ProcessGroup | None = None
    progress: bool = True


@dataclass(frozen=True)
class Batching:
    """At most `tokens` (rows x longest row) per batch, and at most `rows` rows (None: no row limit)."""

    tokens: int
    rows: int | None = None


def plan_batches(lengths: Sequence[int], batching: Batching) -> list[np.ndarray]:
    """Item indices in batches: longest first (stable for equal lengths), each batch under the budget; an
    item longer than the budget is a batch of its own."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, width = [], [], 0
    for index in order:
        width = width or int(lengths[index])
        full = batching.rows is not None and len(current) == batching.rows
        if current and (full or (len(current) + 1) * width > batching.tokens):
            batches.append(np.asarray(current))
            current, width = [], int(lengths[index])
        current.append(index)
    if current:
        batches.append(np.asarray(current))
    return batches


@torch.inference_mode()
def score_items(
    model: FreeLM, items: Sequence[Item], pad: int, placement: Placement, batching: Batching,
    weights: Sequence[float] | None = None, desc: str = "scoring", unit: str = "ex",
) -> np.ndarray:
    """One float64 per item: P(true) for teacher items, the mean target log-probability for LM items.
    The progress bar counts `weights` (e.g. the fraction of an example each item is; default 1 each)."""
    batches = plan_batches([len(item.tokens) for item in items], batching)
    weights = np.ones(len(items)) if weights is None else np.asarray(weights, dtype=np.float64)
    values = torch.zeros(len(items), dtype=torch.float64, device=placement.device)
    size = placement.dp_size
    bar = progress(total=round(weights.sum()), desc=desc, unit=unit, disable=not placement.progress,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    with bar:
        for first in range(0, len(batches), size):
            mine = first + placement.dp_rank
            if mine < len(batches):
                chosen = batches[mine]
                values[torch.from_numpy(chosen).to(placement.device)] = score_batch(model, [items[i] for i in chosen],
                                                                                   pad, placement.device)
            # Ranks move in step: this round stands for every rank's batch.
            bar.update(sum(weights[b].sum() for b in batches[first:first + size]))
    if size > 1:
        dist.all_reduce(values, group=placement.dp_group)
    return values.cpu().numpy()


def score_batch(model: FreeLM, items: Sequence[Item], pad: int, device: torch.device) -> torch.Tensor:
    """The items' values (float64), from one forward pass of the trunk over their right-padded tokens."""
    tokens, lengths = right_pad([item.tokens for item in items], pad)
    lm = [i for i, item in enumerate(items) if item.targets is not None]
    teacher = [i for i, item in enumerate(items) if item.targets is None]
    counts = np.array([len(items[i].targets) for i in lm], dtype=np.int64)
    rows = np.concatenate([np.asarray(teacher, dtype=np.int64), np.repeat(np.asarray(lm, dtype=np.int64), counts)])
    cols = np.concatenate([lengths.numpy()[teacher] - 1, *(items[i].start + np.arange(len(items[i].targets))
                                                          for i in lm)]).astype(np.int64)
    hidden = model.trunk(tokens.to(device))
    chosen = model.norm(hidden[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)])
    out = torch.zeros(len(items), dtype=torch.float64, device=device)
    if teacher:
        p_true = model.teacher_head(chosen[: len(teacher)]).float().softmax(dim=-1)[:, 1]
        out[torch.tensor(teacher, device=device)] = p_true.double()
    if lm:
        targets = torch.from_numpy(np.concatenate([items[i].targets for i in lm]).astype(np.int64)).to(device)
        logprobs = token_logprobs(model, chosen[len(teacher):], targets).double()
        owner = torch.from_numpy(np.repeat(np.arange(len(lm)), counts)).to(device)
        sums = torch.zeros(len(lm), dtype=torch.float64, device=device).index_add_(0, owner, logprobs)
        out[torch.tensor(lm, device=device)] = sums / torch.from_numpy(counts).to(device)
    return out


def token_logprobs(model: FreeLM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for final-norm hidden states (positions, d_model): the tied LM head's fused, chunked,
    vocab-parallel cross-entropy, in fp32, as in training."""
    return -model.lm_head(hidden, targets).token_loss


def proposition_items(tokenizer: Tokenizer, props: Sequence[Proposition], max_len: int) -> tuple[list[Item], list[str]]:
    """Per proposition, a teacher item ("<input> [sep] <proposition> [cls]", cut to `max_len` from the input
    side) and an LM item (the input, then " <proposition>" as targets; `max_len` model positions); then, per
    distinct proposition text, an LM item of " <proposition>" after a bare eos. Each distinct input and
    proposition text is tokenized once. Returns the items and the distinct texts, in the items' order."""
    inputs = list(dict.fromkeys(p.input_text for p in props))
    texts = list(dict.fromkeys(p.proposition_text for p in props))
    head = dict(zip(inputs, tokenizer.encode_batch(inputs)))
    teacher_tail = dict(zip(texts, tokenizer.encode_batch([proposition_tail(t) for t in texts])))
    lm_tail = dict(zip(texts, tokenizer.encode_batch([" " + t for t in texts])))
    items = []
    for p in props:
        ids, tail = head[p.input_text], teacher_tail[p.proposition_text]
        items.append(Item(truncate(np.asarray(ids + tail, dtype=np.int64), len(ids), max_len)))
    for p in props:
        ids, tail = head[p.input_text], lm_tail[p.proposition_text]
        items.append(lm_item(truncate(np.asarray(ids + tail, dtype=np.int64), len(ids), max_len + 1), len(tail)))
    for text in texts:
        items.append(lm_item(np.asarray([tokenizer.special.eos, *lm_tail[text]], dtype=np.int64), len(lm_tail[text])))
    return items, texts


def lm_item(ids: np.ndarray, tail: int) -> Item:
    """The mean log-probability of the last `tail` ids given the ids before them."""
    return Item(tokens=ids[:-1], start=len(ids) - tail - 1, targets=ids[len(ids) - tail:])


def score_propositions(
    model: FreeLM, tokenizer: Tokenizer, props: Sequence[Proposition], max_len: int, placement: Placement,
    batching: Batching, candidates: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """P(true) from the teacher head, and the LM-only score: the mean log-probability of each proposition
    given its input, minus that given only a document boundary (GPT-3's normalisation by the unconditional
    probability), so that a template likelier on its own does not win every example. `candidates`: the
    number of candidates of each proposition's example, so that the progress bar counts examples."""
    items, texts = proposition_items(tokenizer, props, max_len)
    n = len(props)
    share = np.full(n, 1.0) if candidates is None else 1.0 / np.asarray(candidates, dtype=np.float64)
    weights = np.concatenate([share / 2, share / 2, np.zeros(len(texts))])
    values = score_items(model, items, tokenizer.special.pad, placement, batching, weights)
    prior = dict(zip(texts, values[2 * n:]))
    return values[:n], values[n:2 * n] - np.array([prior[p.proposition_text] for p in props])


def perplexity(
    model: FreeLM, ids: np.ndarray, seq_len: int, placement: Placement, batching: Batching, max_windows: int = 64,
) -> float:
    """exp(mean next-token loss) over the first `max_windows` consecutive `seq_len` windows of `ids`."""
    windows = min(max_windows, (len(ids) - 1) // seq_len)
    if windows == 0:
        raise ValueError(f"fewer than {seq_len + 1} tokens")
    items = [lm_item(ids[w * seq_len: (w + 1) * seq_len + 1], seq_len) for w in range(windows)]
    means = score_items(model, items, 0, placement, batching, desc="perplexity", unit="window")
    return float(np.exp(-means.mean()))
