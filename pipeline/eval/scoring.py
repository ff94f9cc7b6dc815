"""Scoring with a FreeLM: propositions (the teacher head's P(true), and the LM-only score), and perplexity.

Every request is an `Item`: the tokens the model reads, and where its answer is read from. A teacher item
is read at its last token (teacher head); an LM item from `start` on, one position per target token (LM head
and vocab-parallel cross-entropy there only: the full-vocab logits of the other positions are never made).
Items come in `Group`s that share a prefix (an example's input, then each candidate's proposition): a group
is one row, its prefix computed once, each item's own tokens attending to the prefix and to themselves
(`pack`). Rows are sorted by length and cut into batches under a token budget; batch j runs on data-parallel
rank j mod DP, and the results are summed over the data-parallel group, so every rank ends with all of them,
in the order of the items, whatever the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from pipeline.data.loaders import right_pad
from pipeline.data.propositions import proposition_tail
from pipeline.data.tasks import Proposition
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import DataError
from pipeline.model.freelm import FreeLM
from pipeline.progress import progress


@dataclass(frozen=True)
class Item:
    """`tokens`: the model's input. `targets` None: a teacher item, read at the last token. Otherwise an LM
    item: position `start + i` predicts `targets[i]`; its value is the mean log-probability of the targets."""

    tokens: np.ndarray
    start: int = 0
    targets: np.ndarray | None = None

    def reads(self) -> np.ndarray:
        """The positions its value is read from."""
        if self.targets is None:
            return np.array([len(self.tokens) - 1])
        return self.start + np.arange(len(self.targets))


@dataclass(frozen=True)
class Group:
    """Items whose first `shared` tokens are the same, scored in one row (see `pack`)."""

    items: tuple[Item, ...]
    shared: int

    @classmethod
    def alone(cls, item: Item) -> Group:
        return cls((item,), len(item.tokens))


@dataclass(frozen=True)
class Row:
    """A packed group: its shared tokens, then each item's own tokens; per token its position in its item
    and its segment (0: shared, k: item k-1's own); per item the row indices its value is read from."""

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    reads: tuple[np.ndarray, ...]
    targets: tuple[np.ndarray | None, ...]


def pack(group: Group) -> Row:
    """One row for the group: each item's own tokens sit at the positions they have in the item and attend
    to the shared tokens and to each other (causally), never to another item's, so every item's value is
    the one it gets alone, for the shared tokens' compute once."""
    shared = group.shared
    prefix = group.items[0].tokens[:shared]
    tokens, positions, segments, reads, at = [prefix], [np.arange(shared)], [np.zeros(shared, np.int64)], [], shared
    for k, item in enumerate(group.items, 1):
        if len(item.tokens) < shared or not np.array_equal(item.tokens[:shared], prefix):
            raise ValueError(f"item {k - 1} of a group does not start with the group's {shared} shared tokens")
        own = item.tokens[shared:]
        tokens.append(own)
        positions.append(np.arange(shared, len(item.tokens)))
        segments.append(np.full(len(own), k, dtype=np.int64))
        at_item = item.reads()
        reads.append(np.where(at_item < shared, at_item, at_item - shared + at))
        at += len(own)
    return Row(np.concatenate(tokens), np.concatenate(positions), np.concatenate(segments), tuple(reads),
               tuple(item.targets for item in group.items))


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
    model: FreeLM, groups: Sequence[Group], pad: int, placement: Placement, batching: Batching,
    weights: Sequence[float] | None = None, desc: str = "scoring", unit: str = "ex",
) -> np.ndarray:
    """One float64 per item, in the groups' order: P(true) for teacher items, the mean target
    log-probability for LM items. The progress bar counts `weights` (one per item, e.g. the fraction of an
    example it is; default 1 each)."""
    rows = [pack(group) for group in groups]
    starts = np.cumsum([0] + [len(group.items) for group in groups])
    weights = np.ones(starts[-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    row_weights = np.add.reduceat(weights, starts[:-1]) if len(rows) else np.zeros(0)
    batches = plan_batches([len(row.tokens) for row in rows], batching)
    values = torch.zeros(int(starts[-1]), dtype=torch.float64, device=placement.device)
    size = placement.dp_size
    bar = progress(total=round(weights.sum()), desc=desc, unit=unit, disable=not placement.progress,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    with bar:
        for first in range(0, len(batches), size):
            mine = first + placement.dp_rank
            if mine < len(batches):
                chosen = batches[mine]
                index = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in chosen])
                values[torch.from_numpy(index).to(placement.device)] = score_batch(
                    model, [rows[g] for g in chosen], pad, placement.device)
            # Ranks move in step: this round stands for every rank's batch.
            bar.update(sum(row_weights[b].sum() for b in batches[first:first + size]))
    if size > 1:
        dist.all_reduce(values, group=placement.dp_group)
    return values.cpu().numpy()


def attention_inputs(rows: Sequence[Row], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (batch, seq) and the boolean attention mask (batch, 1, seq, seq) of right-padded packed
    rows: causal, and a token sees the shared tokens and its own segment only (a pad sees itself at least)."""
    positions, _ = right_pad([row.positions for row in rows], 0)
    segments, _ = right_pad([row.segments for row in rows], -1)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return positions, (causal & ((key == 0) | (key == query)))[:, None]


def score_batch(model: FreeLM, rows: Sequence[Row], pad: int, device: torch.device) -> torch.Tensor:
    """The values (float64) of the rows' items, in order, from one forward pass of the trunk over the
    right-padded rows (plain causal attention when no row packs more than one item)."""
    tokens, _ = right_pad([row.tokens for row in rows], pad)
    positions = mask = None
    if any(row.segments.any() for row in rows):
        positions, mask = (t.to(device) for t in attention_inputs(rows, tokens.shape[1]))
    items = [(r, reads, targets) for r, row in enumerate(rows) for reads, targets in zip(row.reads, row.targets)]
    teacher = [i for i, (_, _, targets) in enumerate(items) if targets is None]
    lm = [i for i, (_, _, targets) in enumerate(items) if targets is not None]
    order = teacher + lm
    counts = np.array([len(items[i][2]) for i in lm], dtype=np.int64)
    row_index = np.concatenate([np.full(len(items[i][1]), items[i][0]) for i in order]).astype(np.int64)
    col_index = np.concatenate([items[i][1] for i in order]).astype(np.int64)
    hidden = model.trunk(tokens.to(device), positions, mask)
    chosen = model.norm(hidden[torch.from_numpy(row_index).to(device), torch.from_numpy(col_index).to(device)])
    out = torch.zeros(len(items), dtype=torch.float64, device=device)
    if teacher:
        p_true = model.teacher_head(chosen[: len(teacher)]).float().softmax(dim=-1)[:, 1]
        out[torch.tensor(teacher, device=device)] = p_true.double()
    if lm:
        targets = torch.from_numpy(np.concatenate([items[i][2] for i in lm]).astype(np.int64)).to(device)
        logprobs = token_logprobs(model, chosen[len(teacher):], targets).double()
        owner = torch.from_numpy(np.repeat(np.arange(len(lm)), counts)).to(device)
        sums = torch.zeros(len(lm), dtype=torch.float64, device=device).index_add_(0, owner, logprobs)
        out[torch.tensor(lm, device=device)] = sums / torch.from_numpy(counts).to(device)
    return out


def token_logprobs(model: FreeLM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for final-norm hidden states (positions, d_model): the tied LM head's fused, chunked,
    vocab-parallel cross-entropy, in fp32, as in training."""
    return -model.lm_head(hidden, targets).token_loss


@dataclass(frozen=True)
class PropositionItems:
    """The groups that score propositions: per distinct input, its propositions' teacher items
    ("<input> [sep] <proposition> [cls]") and LM items (the input, then " <proposition>" as targets) after
    the input they share; then per distinct proposition text an LM item of " <proposition>" after a bare eos.
    `teacher[i]`, `lm[i]`: where proposition i's items are in the flat item order; `texts`: the distinct
    texts, whose items come last, in this order."""

    groups: list[Group]
    teacher: np.ndarray
    lm: np.ndarray
    texts: list[str]


def proposition_items(tokenizer: Tokenizer, props: Sequence[Proposition], max_len: int) -> PropositionItems:
    """An input is cut from its end to fit the longest of its propositions in `max_len` model positions, so
    all its candidates read the same input. Each distinct input and proposition text is tokenized once."""
    by_input: dict[str, list[int]] = {}
    for i, p in enumerate(props):
        by_input.setdefault(p.input_text, []).append(i)
    texts = list(dict.fromkeys(p.proposition_text for p in props))
    heads = dict(zip(by_input, tokenizer.encode_batch(list(by_input))))
    teacher_tail = dict(zip(texts, tokenizer.encode_batch([proposition_tail(t) for t in texts])))
    lm_tail = dict(zip(texts, tokenizer.encode_batch([" " + t for t in texts])))
    groups, teacher, lm, at = [], np.zeros(len(props), np.int64), np.zeros(len(props), np.int64), 0
    for text, members in by_input.items():
        longest = max(max(len(teacher_tail[props[i].proposition_text]), len(lm_tail[props[i].proposition_text]) - 1)
                      for i in members)
        if longest >= max_len:
            raise DataError(f"a proposition of {longest} tokens leaves no room for its input in {max_len}")
        head = heads[text][: max_len - longest]
        items = [Item(np.asarray(head + teacher_tail[props[i].proposition_text], dtype=np.int64)) for i in members]
        items += [lm_item(np.asarray(head + lm_tail[props[i].proposition_text], dtype=np.int64),
                          len(lm_tail[props[i].proposition_text])) for i in members]
        teacher[members] = at + np.arange(len(members))
        lm[members] = at + len(members) + np.arange(len(members))
        groups.append(Group(tuple(items), len(head)))
        at += len(items)
    for text in texts:
        groups.append(Group.alone(lm_item(np.asarray([tokenizer.special.eos, *lm_tail[text]], dtype=np.int64),
                                          len(lm_tail[text]))))
    return PropositionItems(groups, teacher, lm, texts)


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
    packed = proposition_items(tokenizer, props, max_len)
    n, share = len(props), np.full(len(props), 1.0) if candidates is None else 1.0 / np.asarray(candidates, float)
    weights = np.zeros(n * 2 + len(packed.texts))
    weights[packed.teacher] = weights[packed.lm] = share / 2
    values = score_items(model, packed.groups, tokenizer.special.pad, placement, batching, weights)
    prior = dict(zip(packed.texts, values[2 * n:]))
    return values[packed.teacher], values[packed.lm] - np.array([prior[p.proposition_text] for p in props])


def perplexity(
    model: FreeLM, ids: np.ndarray, seq_len: int, placement: Placement, batching: Batching, max_windows: int = 64,
) -> float:
    """exp(mean next-token loss) over the first `max_windows` consecutive `seq_len` windows of `ids`."""
    windows = min(max_windows, (len(ids) - 1) // seq_len)
    if windows == 0:
        raise ValueError(f"fewer than {seq_len + 1} tokens")
    groups = [Group.alone(lm_item(ids[w * seq_len: (w + 1) * seq_len + 1], seq_len)) for w in range(windows)]
    means = score_items(model, groups, 0, placement, batching, desc="perplexity", unit="window")
    return float(np.exp(-means.mean()))
