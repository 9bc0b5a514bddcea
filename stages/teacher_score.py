"""Teacher-score stage: the teacher runs over prompt + response and keeps its final hidden states.

Reads `responses`, writes `teacher_hidden` (final-norm hidden states; the loss applies the teacher's lm_head chunk by
chunk, so full teacher logits never exist). micro_batch_tokens also sets the fused training micro-batch.
"""

from __future__ import annotations

import attrs

from opdgraph.config.fields import positive, setting

READS = ("responses",)
WRITES = ("teacher_hidden",)
MODEL_FIELDS = ("model",)


@attrs.frozen(kw_only=True)
class Config:
    model: str = setting("teacher", help="the [models.<name>] entry that scores")
    micro_batch_tokens: int = setting(4096, help="packed tokens per teacher forward (and per training micro-batch)",
                                      check=positive)


def execute(step, config: Config, ctx, loop) -> None:
    from opdgraph.runtime import training

    training.teacher_score(ctx, loop)
