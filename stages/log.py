"""Log stage: scalars (loss, divergence, grad norm, lr, throughput) to the console and metrics.jsonl, plus samples.

`report_to` names the experiment trackers that get the same records too (opdgraph.runtime.reporters: TensorBoard,
Weights & Biases, MLflow; each an optional extra, imported only when named). Reads `student_weights` (so it runs at
the end of a step), writes `log_record`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import work as W
from opdgraph.config.fields import non_negative, positive, setting
from opdgraph.drafts import Draft

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("student_weights",)
WRITES = ("log_record",)
PERIODIC = True  # runs every n steps: not part of one training step's time


def _distinct(value) -> str | None:
    repeated = sorted({name for name in value if value.count(name) > 1})
    return f"names {', '.join(map(repr, repeated))} more than once; name each tracker once" if repeated else None


@attrs.frozen(kw_only=True)
class Config:
    every_n_steps: int = setting(1, help="log scalars every n steps", check=positive)
    sample_every_n_steps: int = setting(0, help="print a rollout sample every n steps (0 = off)", check=non_negative)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = setting(
        [], help="experiment trackers that also get every metrics.jsonl record, the resolved config and the plan's "
                 "summary (rank 0 only): tensorboard (event files in output_dir/tensorboard), wandb, mlflow; each "
                 "needs its extra, e.g. pip install \"opdgraph[wandb]\"", check=_distinct)
    progress: bool = setting(True, help="show a progress bar")

    # Keys this table no longer has, with what to write instead (opdgraph.config.strict reports them so).
    REMOVED_KEYS = {"tensorboard": "removed: TensorBoard is now one of the trackers of log.report_to; write "
                                   "report_to = [\"tensorboard\"] for event files in output_dir/tensorboard, or "
                                   "delete this key (no tracker is written by default)"}


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """A step of no modelled cost."""
    return [Draft(stage_name, stage_name, "log", (), (), (), 1, W.Work())]


def run_settings(config: Config) -> dict[str, object]:
    """What the run loop's progress line follows (opdgraph.runtime.run), and the trackers the run reports to
    (opdgraph.runtime.reporters)."""
    return {"progress": config.progress, "log_every_n_steps": config.every_n_steps, "report_to": config.report_to}


def bind(stage_name: str, config: Config, run) -> dict:
    return {"tokenizer": run.tokenizer}


def execute(step, config: Config, inputs: StageInputs) -> None:
    """Records the step's sample responses every `sample_every_n_steps` steps (metrics go to metrics.jsonl always)."""
    run = inputs.run
    if config.sample_every_n_steps and run.step % config.sample_every_n_steps == 0:
        from opdgraph.runtime.metrics import log_rollout_samples

        log_rollout_samples(run, inputs.models["tokenizer"], count=2)
