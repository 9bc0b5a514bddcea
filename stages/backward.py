"""Backward stage: backpropagates `hidden_grad` through the student trunk into the gradient buffers.

Reads `hidden_grad`, writes `grads`. Gradient buffers are allocated at the first backward and freed after the
optimizer step, so they never coexist with the rollout KV cache.
"""

from __future__ import annotations

import attrs

from opdgraph.config.fields import setting

READS = ("hidden_grad",)
WRITES = ("grads",)


@attrs.frozen(kw_only=True)
class Config:
    activation_checkpointing: bool = setting(False, help="keep only each layer's input; recompute the rest in "
                                                         "backward (less memory, one more forward)")


def execute(step, config: Config, ctx, loop) -> None:
    from opdgraph.runtime import training

    if step.name.endswith(".forward"):  # unfused plan: the forward with graph runs here
        training.student_forward(ctx, loop, keep_graph=True, write_hidden=False)
    else:
        training.backward(ctx, loop)
