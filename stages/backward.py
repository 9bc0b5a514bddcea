"""Backward stage: backpropagates `hidden_grad` through the student trunk into the gradient buffers.

Reads `hidden_grad`, writes `grads`. Gradient buffers are allocated at the first micro-batch and freed after the
optimizer step, so they never coexist with the rollout KV cache. With a bf16 (non-fp32) student the gradients of a
step's micro-batches are summed in fp32 accumulators by default (opdgraph.runtime.gradients): each micro-batch's
bf16 gradient is folded in as soon as autograd (or FSDP's reduce-scatter) produces it, so the sum is exact to fp32
instead of rounding to 8 mantissa bits at every add.
"""

from __future__ import annotations

from typing import Literal

import attrs

from opdgraph.config.fields import setting

READS = ("hidden_grad",)
WRITES = ("grads",)


@attrs.frozen(kw_only=True)
class Config:
    activation_checkpointing: bool = setting(False, help="keep only each layer's input; recompute the rest in "
                                                         "backward (less memory, one more forward)")
    grad_accumulation_dtype: Literal["float32", "model"] = setting(
        "float32", help="dtype the gradients of a step's micro-batches are summed in: float32 (P x 4 bytes, exact "
                        "sums) or the model's dtype (bf16: P x 2 bytes, but every micro-batch's add rounds to 8 "
                        "mantissa bits); an fp32 student sums in fp32 either way")


def execute(step, config: Config, ctx, loop) -> None:
    from opdgraph.runtime import training

    if step.name.endswith(".forward"):  # unfused plan: the forward with graph runs here
        training.student_forward(ctx, loop, keep_graph=True, write_hidden=False)
    else:
        training.backward(ctx, loop)
