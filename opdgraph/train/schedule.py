"""Learning-rate schedules: the lr the ``step`` stage passes to ``MasterAdamW.step`` at each optimizer step.

Steps are 0-based. Warmup (when warmup_steps > 0): lr = base_lr * (step + 1) / warmup_steps for step < warmup_steps,
so the first step already moves and step warmup_steps - 1 reaches base_lr. After warmup, with
progress = (step - warmup_steps) / (total_steps - 1 - warmup_steps) clamped to [0, 1] and min_lr = min_lr_ratio *
base_lr:
- ``constant``: base_lr
- ``cosine``:   min_lr + (base_lr - min_lr) * (1 + cos(pi * progress)) / 2
- ``linear``:   base_lr + (min_lr - base_lr) * progress
so the decay starts at base_lr right after warmup and reaches min_lr at step total_steps - 1. When warmup leaves no
step to decay over (total_steps - 1 <= warmup_steps), the lr stays at base_lr after warmup.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

ScheduleName = Literal["constant", "cosine", "linear"]  # the step stage's `schedule` setting
SCHEDULES = get_args(ScheduleName)


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
    """The learning rate of 0-based optimizer step ``step`` (see module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < 0 or warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need step >= 0, warmup_steps >= 0, total_steps >= 1; got {step}, {warmup_steps}, "
                         f"{total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if schedule == "constant" or decay_steps <= 0:
        return base_lr
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    min_lr = min_lr_ratio * base_lr
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr + (min_lr - base_lr) * progress
