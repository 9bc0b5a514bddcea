"""Checkpoint stage: saves the student (HF safetensors layout) and the optimizer state.

Reads `student_weights`, writes `checkpoint`. The stage decides that this step is saved; the run loop saves it at
the very end of the step, after the step's metrics and samples records are written and fsynced
(opdgraph.runtime.run), so a checkpoint never exists without every record of the steps it covers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting
from opdgraph.drafts import Draft

if TYPE_CHECKING:  # the compiler's facts; a type only, so importing a stage stays light
    from opdgraph.stage_plan import StageFacts

READS = ("student_weights",)
WRITES = ("checkpoint",)
PERIODIC = True  # runs every n steps: not part of one training step's time


@attrs.frozen(kw_only=True)
class Config:
    every_n_steps: int = setting(0, help="save every n steps (0 = at the end only)", check=non_negative)
    keep_last: int = setting(2, help="checkpoints kept on disk", check=positive)
    on_signal: bool = setting(True, help="on SIGINT / SIGTERM, save the step being finished before stopping")


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """Writes the weights and the optimizer state (12 bytes a parameter: fp32 masters and two moments)."""
    saved = facts.student_weight_bytes + facts.student_shape.parameter_count() * 12
    reads = (f"{facts.student}.weights", f"{facts.student}.optimizer_state")
    return [Draft(stage_name, stage_name, "checkpoint", reads, (), (), 1, W.transfer_work(saved, facts.hardware))]


def execute(step, config: Config, ctx, loop) -> None:
    """Periodic: every `every_n_steps` training steps and after the last one."""
    if ctx.step == ctx.num_steps or (config.every_n_steps and ctx.step % config.every_n_steps == 0):
        ctx.checkpoint_due = True
