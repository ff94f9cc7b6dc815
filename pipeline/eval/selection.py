"""Which examples of a task are evaluated, and the class of its majority baseline.

`--limit N` takes a random sample of N examples (files are often sorted by label, so the first N may all
be one class), drawn by an RNG seeded with the text "<seed>/<task>/<split>": the same sample in every
process and on every run, whatever PYTHONHASHSEED. The majority class is counted on the task's train
split (the evaluated split's own majority would use the answers being scored); a task without one falls
back to the whole evaluated split, and the report says so.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from pipeline.data.tasks import Proposition, SplitStats, TaskSpec, iter_propositions

MAJORITY_SPLIT = "train"
T = TypeVar("T")


@dataclass(frozen=True)
class Selected:
    """One task's evaluated examples and what the report states about them."""

    groups: list[list[Proposition]]  # per example, its candidates in label order
    of: int  # examples in the split
    seed: int | None  # the seed of the random sample; None when all `of` examples are evaluated
    majority: str  # the majority baseline's class
    majority_from: str  # the split it was counted on: train, or the evaluated one when the task has none


def sample(items: Sequence[T], limit: int | None, seed: int, key: str) -> list[T]:
    """All of `items` when at most `limit` (or no limit), else `limit` of them drawn at random by an RNG seeded
    with "<seed>/<key>", kept in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    chosen = sorted(random.Random(f"{seed}/{key}").sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def majority_class(spec: TaskSpec, split: str, groups: Sequence[list[Proposition]]) -> tuple[str, str]:
    """The most frequent gold label of the task's train split and "train"; for a task without one, that of
    `groups` (all examples of `split`) and `split`. Ties go to the label declared first."""
    if MAJORITY_SPLIT in spec.files:
        source = MAJORITY_SPLIT
        golds = [p.gold for p in iter_propositions(spec, source, SplitStats(), negatives_per_positive=0)]
    else:
        source, golds = split, [group[0].gold for group in groups]
    counts = Counter(golds)
    return max(spec.label_names, key=lambda name: counts[name]), source


def select(spec: TaskSpec, split: str, groups: Sequence[list[Proposition]], limit: int | None, seed: int) -> Selected:
    """The examples of `split` (`groups`, all of them in file order) to evaluate: a seeded sample of `limit`
    when there are more, with the majority baseline's class."""
    chosen = sample(groups, limit, seed, f"{spec.name}/{split}")
    majority, source = majority_class(spec, split, groups)
    return Selected(chosen, len(groups), seed if len(chosen) < len(groups) else None, majority, source)
