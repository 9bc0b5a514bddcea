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

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
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


def run_settings(config: Config) -> dict[str, object]:
    """How the run loop saves (opdgraph.runtime.run): how many checkpoints it keeps, and whether a signal saves."""
    return {"checkpoint_keep_last": config.keep_last, "checkpoint_on_signal": config.on_signal}


def execute(step, config: Config, inputs: StageInputs) -> None:
    """Periodic: every `every_n_steps` training steps and after the last one."""
    run = inputs.run
    if run.step == run.num_steps or (config.every_n_steps and run.step % config.every_n_steps == 0):
        run.request_checkpoint()
