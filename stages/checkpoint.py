"""Checkpoint stage: saves the student (HF safetensors layout) and the optimizer state.

Reads `student_weights`, writes `checkpoint`.
"""

from __future__ import annotations

import attrs

from opdgraph.config.fields import non_negative, positive, setting

READS = ("student_weights",)
WRITES = ("checkpoint",)


@attrs.frozen(kw_only=True)
class Config:
    every_n_steps: int = setting(0, help="save every n steps (0 = at the end only)", check=non_negative)
    keep_last: int = setting(2, help="checkpoints kept on disk", check=positive)
