"""Eval stage: greedy (or sampled) generations on held-out prompts, scored against the teacher, shown as samples.

Reads `student_weights` (after the optimizer step), writes `eval_metrics`.
"""

from __future__ import annotations

import attrs

from opdgraph.config.fields import non_negative, positive, setting

READS = ("student_weights",)
WRITES = ("eval_metrics",)


@attrs.frozen(kw_only=True)
class Config:
    every_n_steps: int = setting(0, help="evaluate every n steps (0 = only before and after training)",
                                 check=non_negative)
    files: list[str] | None = setting(None, help="prompt files (default: data.eval_files)")
    num_prompts: int = setting(32, help="prompts evaluated", check=positive)
    max_new_tokens: int | None = setting(None, help="most tokens per response (default: rollout.max_new_tokens)",
                                         check=positive)
    greedy: bool = setting(True, help="argmax decoding (false: sample like rollout)")
    num_samples_to_show: int = setting(3, help="responses printed/logged per evaluation", check=non_negative)


def execute(step, config: Config, ctx, loop) -> None:
    """Periodic: every `every_n_steps` training steps and after the last one (the run also evaluates before)."""
    final = ctx.step == ctx.num_steps
    if final or (config.every_n_steps and ctx.step % config.every_n_steps == 0):
        from opdgraph.runtime.evaluation import run_eval

        label = "final" if final else "periodic"
        ctx.eval_records.append(run_eval(config, ctx, stage=step.stage, label=label))
