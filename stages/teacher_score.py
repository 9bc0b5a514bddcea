"""Teacher-score stage: the teacher runs over prompt + response and keeps its final hidden states.

Reads `responses`, writes `teacher_hidden` (final-norm hidden states; the loss applies the teacher's lm_head chunk by
chunk, so full teacher logits never exist). micro_batch_tokens also sets the fused training micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import positive, setting
from opdgraph.drafts import Draft, buffer
from opdgraph.plan import Buffer

if TYPE_CHECKING:  # the compiler's facts; a type only, so importing a stage stays light
    from opdgraph.stage_plan import StageFacts

READS = ("responses",)
WRITES = ("teacher_hidden",)
MODEL_FIELDS = ("model",)


@attrs.frozen(kw_only=True)
class Config:
    model: str = setting("teacher", help="the [models.<name>] entry that scores")
    micro_batch_tokens: int = setting(4096, help="packed tokens per teacher forward (and per training micro-batch)",
                                      check=positive)


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """One teacher forward per micro-batch, in the training micro-batch loop."""
    shape, counts = facts.teacher_shape, facts.counts
    flops = W.forward_flops(shape, counts.micro_batch_tokens, counts.sequence_tokens)
    moved = facts.teacher_weight_bytes + counts.micro_batch_tokens * shape.hidden * facts.teacher_dtype_bytes
    return [Draft(stage_name, stage_name, "teacher_score", (f"{facts.teacher}.weights", "responses"),
                  ("teacher_hidden", f"{stage_name}.workspace"), facts.loop(stage_name), counts.num_micro_batches,
                  W.roofline(flops, moved, 0, facts.hardware, counts.num_micro_batches))]


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """The teacher's hidden states (a micro-batch's fused, the batch's unfused) and its forward's workspace."""
    shape, dtype_bytes, counts = facts.teacher_shape, facts.teacher_dtype_bytes, facts.counts
    tokens, keys = facts.crossing_tokens
    reference = facts.reference_tokens("teacher", counts.sequence_tokens)
    return [
        buffer("teacher_hidden", "teacher_hidden", sizing.hidden_state_bytes(shape, tokens, dtype_bytes),
               (*keys, *facts.teacher_keys), formula="tokens x h_teacher x d"),
        buffer(f"{stage_name}.workspace", "workspace",
               sizing.forward_workspace_bytes(shape, counts.micro_batch_tokens, dtype_bytes, reference),
               (*facts.micro_keys, "pipeline.device", *facts.teacher_keys),
               formula=_workspace_formula("micro-batch tokens", reference)),
    ]


def _workspace_formula(tokens: str, reference: int) -> str:
    mlp = f"{tokens} x ((4 h + 3 i) x d + 4 x head_dim x d) (no-grad forward, inside an MLP)"
    if not reference:
        return mlp
    return (f"max({mlp}, {tokens} x (2 h + 2 q + 2 kv + 4 head_dim) x d + S x q x d + S^2 x (heads x w + 1) "
            f"(torch attention's scores, S = {reference}; w = d + 8, fp32: 8))")


def execute(step, config: Config, ctx, loop) -> None:
    from opdgraph.runtime import training

    training.teacher_score(ctx, loop)
