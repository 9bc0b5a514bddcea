"""Log stage: scalars (loss, divergence, grad norm, lr, throughput) to the console and TensorBoard, plus samples.

Reads `student_weights` (so it runs at the end of a step), writes `log_record`.
"""

from __future__ import annotations

import attrs

from opdgraph.config.fields import non_negative, positive, setting

READS = ("student_weights",)
WRITES = ("log_record",)


@attrs.frozen(kw_only=True)
class Config:
    every_n_steps: int = setting(1, help="log scalars every n steps", check=positive)
    sample_every_n_steps: int = setting(0, help="print a rollout sample every n steps (0 = off)", check=non_negative)
    tensorboard: bool = setting(True, help="write TensorBoard event files under output_dir")
    progress: bool = setting(True, help="show a progress bar")


def execute(step, config: Config, ctx, loop) -> None:
    """Records the step's sample responses every `sample_every_n_steps` steps (metrics go to metrics.jsonl always)."""
    if config.sample_every_n_steps and ctx.step % config.sample_every_n_steps == 0:
        from opdgraph.runtime.metrics import log_rollout_samples

        log_rollout_samples(ctx, count=2)
