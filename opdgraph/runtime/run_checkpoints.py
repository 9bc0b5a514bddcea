"""What a run saves in a checkpoint and restores from one (the file format is opdgraph.runtime.checkpoint's):
the trainer state (step, optimizer, sampler, skip counts, RNG) beside the student's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime import distributed, fsdp
from opdgraph.runtime.context import RunContext


def trainer_state(ctx: RunContext) -> dict[str, Any]:
    return {"step": ctx.step, "optimizer": ctx.optimizer.state_dict(), "sampler": ctx.sampler.state_dict(),
            "skipped_steps": ctx.skipped_steps.state_dict(),
            "rng": ckpt.rng_state()}

def save_run_checkpoint(ctx: RunContext, *, keep_last: int, run_config: dict | None) -> Path:
    """Every rank takes part (the weights and optimizer state are gathered); rank 0 writes, after making the logs of
    every step so far durable (a checkpoint never covers a step whose records could still be lost)."""
    from opdgraph.models import save_pretrained

    state = trainer_state(ctx)
    student = fsdp.GatheredModel(ctx.student) if distributed.world_size() > 1 else ctx.student
    path = ckpt.checkpoint_dir(ctx.run_dir, ctx.step)
    if distributed.is_main():
        ctx.metrics.sync()
        path = ckpt.save_checkpoint(ctx.run_dir, ctx.step,
                                    save_student=lambda d: save_pretrained(student, d, tokenizer=ctx.tokenizer),
                                    trainer_state=state, summary={"num_steps": ctx.num_steps,
                                                                  "world_size": distributed.world_size()},
                                    config_record=run_config, keep_last=keep_last)
    distributed.barrier()  # nobody moves on (or reads the directory) before the checkpoint is whole
    return path

def restore(ctx: RunContext, checkpoint: Path) -> None:
    """Continue from a checkpoint: optimizer (fp32 masters and moments), data cursor, RNG states; the weights were
    loaded by build_context before sharding. The checkpoint may come from any number of ranks."""
    state = ckpt.load_trainer_state(checkpoint)
    ctx.optimizer.load_state_dict(state["optimizer"])
    ctx.sampler.load_state_dict(state["sampler"])
    ctx.skipped_steps.load_state_dict(state["skipped_steps"])
    ckpt.set_rng_state(state["rng"])
    ctx.step = int(state["step"])
