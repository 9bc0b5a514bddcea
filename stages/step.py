"""Optimizer step: AdamW on fp32 master weights, with gradient clipping and a learning-rate schedule.

Reads `grads`, writes `student_weights`. A step whose gradient norm is not finite, or whose update would make a weight
non-finite, is skipped (nothing changes; the step's record says why); `max_consecutive_skipped_steps` skips in a row
stop the run with opdgraph.errors.TrainingStopped, and so does a run none of whose steps was applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting, unit_interval
from opdgraph.drafts import OPTIMIZER_UPDATE, Draft
from opdgraph.train.schedule import ScheduleName

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("grads",)
WRITES = ("student_weights",)


def _betas(value) -> str | None:
    return None if all(0 <= beta < 1 for beta in value) else f"each beta must be in [0, 1), got {list(value)}"


@attrs.frozen(kw_only=True)
class Config:
    lr: float = setting(help="peak learning rate", check=positive)
    betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW beta1, beta2", check=_betas)
    eps: float = setting(1e-8, help="AdamW epsilon", check=positive)
    weight_decay: float = setting(0.0, help="decoupled weight decay", check=non_negative)
    max_grad_norm: float = setting(1.0, help="clip the global gradient norm (0 = off)", check=non_negative)
    schedule: ScheduleName = setting("constant", help="learning-rate schedule after warmup")
    warmup_steps: int = setting(0, help="linear warmup steps from 0 to lr", check=non_negative)
    min_lr_ratio: float = setting(0.0, help="cosine/linear decay floor as a fraction of lr", check=unit_interval)
    max_consecutive_skipped_steps: int = setting(
        3, help="stop the run after this many optimizer steps in a row were skipped (non-finite gradient norm or "
                "update); 0 = never stop for that (a run none of whose steps was applied still stops)",
        check=non_negative)


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """One AdamW update per training step (an fp32 student has no separate master weights)."""
    student = facts.student
    state = (*(() if facts.student_fp32 else (f"{student}.master_weights",)), f"{student}.optimizer_state")
    return [Draft(stage_name, stage_name, "step", (f"{student}.grads", *state), (f"{student}.weights",), (), 1,
                  W.optimizer_work(facts.student_shape.parameter_count(), facts.student_dtype_bytes,
                                   4 if facts.fp32_grads else facts.student_dtype_bytes, facts.hardware),
                  frozenset({OPTIMIZER_UPDATE}))]


def run_settings(config: Config) -> dict[str, object]:
    """What the run builds the optimizer with (opdgraph.runtime.build)."""
    return {"optimizer_settings": {"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps,
                                   "weight_decay": config.weight_decay}}


def bind(stage_name: str, config: Config, run) -> dict:
    """The optimizer, the gradients it applies, and the record of skipped steps (which may stop the run)."""
    return {"optimizer": run.optimizer, "gradients": run.gradients, "skipped_steps": run.skipped_steps}


def execute(step, config: Config, inputs: StageInputs) -> None:
    from opdgraph.runtime import training

    training.optimizer_step(config, inputs, stage=step.stage)
