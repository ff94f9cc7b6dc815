"""Per-task zero-shot metrics from proposition scores: each scorer predicts its best candidate per example."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


def task_result(
    task: str, labels: int, gold: np.ndarray, candidates: np.ndarray, p_true: np.ndarray, lm: np.ndarray,
) -> TaskResult:
    """`gold`: each example's gold label index; `candidates`: how many propositions each example has (in
    label order, consecutive in `p_true` and `lm`). Accuracy of the teacher head (with F1 and MCC when the
    task has two labels), of the LM-only score, and of always answering the most frequent gold label."""
    bounds = np.cumsum(np.concatenate([[0], candidates]))
    pred = np.array([np.argmax(p_true[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    lm_pred = np.array([np.argmax(lm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    result = TaskResult(
        task=task, n=len(gold), accuracy=float(np.mean(pred == gold)),
        majority=float(np.bincount(gold).max() / len(gold)), lm_only=float(np.mean(lm_pred == gold)),
    )
    if labels == 2:
        result.f1, result.mcc = binary_f1_mcc(gold, pred)
    return result
