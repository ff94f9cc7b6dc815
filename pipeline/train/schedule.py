"""Which signal(s) each optimizer step trains.

`interactive` (the paper): steps alternate in blocks, N language steps then M teacher steps (default 1:1);
one step never mixes the two losses. `mixed` (the authors' follow-up, FLM-101B): every step draws both a
language and a teacher batch and backpropagates their weighted sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import TrainConfig

LANGUAGE, TEACHER = "language", "teacher"


@dataclass(frozen=True)
class Schedule:
    mode: str = "interactive"
    language_steps: int = 1
    teacher_steps: int = 1

    @classmethod
    def from_config(cls, train: TrainConfig) -> Schedule:
        return cls(train.schedule, train.language_steps, train.teacher_steps)

    def signals(self, step: int) -> tuple[str, ...]:
        """The signals trained at 0-based optimizer step `step`."""
        if self.mode == "mixed":
            return (LANGUAGE, TEACHER)
        position = step % (self.language_steps + self.teacher_steps)
        return (LANGUAGE,) if position < self.language_steps else (TEACHER,)

    def count(self, signal: str, steps: int) -> int:
        """How many of the first `steps` optimizer steps train `signal`."""
        if self.mode == "mixed":
            return steps
        cycle = self.language_steps + self.teacher_steps
        full, rest = divmod(steps, cycle)
        if signal == LANGUAGE:
            return full * self.language_steps + min(rest, self.language_steps)
        return full * self.teacher_steps + max(0, rest - self.language_steps)


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at the last step."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
