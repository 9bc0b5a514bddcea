"""The gold-prefix schedule of hybrid SFT + OPD: how many gold tokens a row's rollout starts from at a training step.

A row whose gold solution has L tokens (in the context of its prompt, opdgraph.data.gold_prefix) starts its rollout
at step s (training steps completed before it, 0 for the first) from its first

    k(L, s) = min(floor(f(s) x max_tokens), floor(f(s) x fraction x L))

gold tokens, with the schedule's factor f: `constant` f(s) = 1; `linear` f(s) = max(0, (N - s) / N) over
N = decay_steps (the full prefix at the first step, none from step N on: plain OPD). The arithmetic is exact
(rationals; `fraction` is read as the decimal it is written as, so 0.3 x 10 is 3, not 2.999...). k depends on the
step alone, so a resumed run (its step restored from the checkpoint) gives every row the prefix an uninterrupted run
gives it. Torch-free.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal, get_args

import attrs

PrefixScheduleName = Literal["constant", "linear"]  # the sft stage's `schedule` setting
SCHEDULES = get_args(PrefixScheduleName)


@attrs.frozen(kw_only=True)
class PrefixSchedule:
    max_tokens: int  # the prefix never exceeds this many tokens (the plan's bound)
    fraction: float = 1.0  # at most this share of the gold's tokens
    schedule: str = "constant"
    decay_steps: int = 0  # linear: steps until the prefix is gone

    def factor(self, step: int) -> Fraction:
        """f(step) of the module docstring, exactly."""
        if self.schedule == "constant":
            return Fraction(1)
        if self.schedule == "linear":
            return Fraction(max(0, self.decay_steps - step), self.decay_steps)
        raise ValueError(f"unknown prefix schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def tokens(self, gold_tokens: int, step: int) -> int:
        """k: how many of a gold solution's `gold_tokens` tokens are placed before the rollout at `step`."""
        scale = self.factor(step)
        by_fraction = math.floor(scale * Fraction(repr(self.fraction)) * gold_tokens)
        return min(math.floor(scale * self.max_tokens), by_fraction)
