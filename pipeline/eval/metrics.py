"""Per-task zero-shot metrics from proposition scores: each scorer predicts its best candidate per example.

Every accuracy comes with its 95% Wilson score interval; F1 is of the task's declared positive class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.data.tasks import TaskSpec
from pipeline.eval.selection import Selected

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass
class TaskResult:
    task: str
    n: int  # examples evaluated
    of: int  # examples in the split
    seed: int | None  # the seed of the random sample (--limit); None when all were evaluated
    accuracy: float  # the teacher head's
    accuracy_ci: Interval
    lm_only: float
    lm_only_ci: Interval
    majority: float  # share of `majority_label` among the evaluated examples
    majority_ci: Interval
    majority_label: str
    majority_from: str  # the split the majority class was counted on
    positive: str | None = None  # two-label tasks: the class of F1
    f1: float | None = None
    mcc: float | None = None


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of the proportion successes / n (95% at the default z)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p, z2 = successes / n, z * z
    scale = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / scale
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def binary_f1_mcc(gold: np.ndarray, pred: np.ndarray, positive: int) -> tuple[float, float]:
    """F1 of the class with index `positive`, and Matthews correlation (0 when undefined)."""
    g, p = gold == positive, pred == positive
    tp, tn = float(np.sum(p & g)), float(np.sum(~p & ~g))
    fp, fn = float(np.sum(p & ~g)), float(np.sum(~p & g))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return f1, ((tp * tn - fp * fn) / denominator if denominator else 0.0)


def task_result(spec: TaskSpec, selected: Selected, p_true: np.ndarray, lm: np.ndarray) -> TaskResult:
    """`p_true` and `lm`: the two scores of every candidate of `selected`, example after example. Accuracy of
    the teacher head (with F1 and MCC when the task has two labels), of the LM-only score, and of always
    answering the majority class."""
    labels = spec.label_names
    gold = np.array([labels.index(group[0].gold) for group in selected.groups])
    bounds = np.cumsum([0, *(len(group) for group in selected.groups)])
    pred = np.array([np.argmax(p_true[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    lm_pred = np.array([np.argmax(lm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    n = len(gold)
    hits, lm_hits = int(np.sum(pred == gold)), int(np.sum(lm_pred == gold))
    base_hits = int(np.sum(gold == labels.index(selected.majority)))
    result = TaskResult(
        task=spec.name, n=n, of=selected.of, seed=selected.seed,
        accuracy=hits / n, accuracy_ci=wilson(hits, n), lm_only=lm_hits / n, lm_only_ci=wilson(lm_hits, n),
        majority=base_hits / n, majority_ci=wilson(base_hits, n),
        majority_label=selected.majority, majority_from=selected.majority_from, positive=spec.positive,
    )
    if spec.positive is not None:
        result.f1, result.mcc = binary_f1_mcc(gold, pred, labels.index(spec.positive))
    return result
