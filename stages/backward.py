"""Backward stage: backpropagates `hidden_grad` through the student trunk into the gradient buffers.

Reads `hidden_grad` (and in a hybrid SFT pipeline `sft_hidden_grad`, stages/sft.py), writes `grads`. Gradient
buffers are allocated at the first micro-batch and freed after the optimizer step, so they never coexist with the
rollout KV cache. With a bf16 (non-fp32) student the gradients of a step's micro-batches are summed in fp32
accumulators by default (opdgraph.runtime.gradients): each micro-batch's bf16 gradient is folded in as soon as
autograd (or FSDP's reduce-scatter) produces it, so the sum is exact to fp32
instead of rounding to 8 mantissa bits at every add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import attrs

from opdgraph import sizing
from opdgraph import work as W
from opdgraph.config.fields import setting
from opdgraph.drafts import STUDENT_BACKWARD, Draft, buffer
from opdgraph.plan import Buffer
from opdgraph.stages import backward_buffers_of, backward_values_of

if TYPE_CHECKING:  # the compiler's facts and the runtime's inputs; types only, so importing a stage stays light
    from opdgraph.runtime.stage_inputs import StageInputs
    from opdgraph.stage_plan import StageFacts

READS = ("hidden_grad",)
WRITES = ("grads",)
MICRO_BATCH = True  # runs once per training micro-batch (fused with the other such stages into one loop)


@attrs.frozen(kw_only=True)
class Config:
    activation_checkpointing: bool = setting(False, help="keep only each layer's input; recompute the rest in "
                                                         "backward (less memory, one more forward)")
    grad_accumulation_dtype: Literal["float32", "model"] = setting(
        "float32", help="dtype the gradients of a step's micro-batches are summed in: float32 (P x 4 bytes, exact "
                        "sums) or the model's dtype (bf16: P x 2 bytes, but every micro-batch's add rounds to 8 "
                        "mantissa bits); an fp32 student sums in fp32 either way")


def step_settings(config: Config) -> dict[str, object]:
    """Checkpointing sets what the student's training forward saves (planned by the loss); the accumulation dtype
    sizes the gradients (opdgraph.buffers)."""
    return {"activation_checkpointing": config.activation_checkpointing,
            "grad_accumulation_dtype": config.grad_accumulation_dtype}


def values(stage_name: str, config: Config, stages: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Reads the loss's hidden-state gradient and those other stages hand it (in a hybrid SFT pipeline the sft
    stage's: stages/sft.py's BACKWARD_READS)."""
    return (*READS, *backward_values_of(stages)), WRITES


def plan_steps(stage_name: str, config: Config, facts: StageFacts) -> list[Draft]:
    """One backward per micro-batch (recomputing the forward with activation checkpointing)."""
    counts, student = facts.counts, facts.student
    comm = (f"{student}.fsdp_comm",) if facts.world_size > 1 else ()
    forward = W.forward_flops(facts.student_shape, counts.micro_batch_tokens, counts.sequence_tokens)
    flops = forward * (3 if config.activation_checkpointing else 2)
    moved = 3 * facts.student_weight_bytes  # read weights; read+write gradient accumulators
    # responses: the micro-batch's trained positions, where the hidden-state gradient is scattered.
    local, micro = facts.local, facts.group_micro_batches if facts.fused else counts.num_micro_batches
    # In a hybrid SFT pipeline the gold prefix's gradient is scattered beside the loss's.
    return [Draft(local(stage_name), stage_name, "backward",
                  (f"{student}.weights", local("hidden_grad"), *backward_buffers_of(facts), local("student_activations"),
                   "responses", *comm),
                  (f"{student}.grads", local(f"{stage_name}.workspace")), facts.loop(stage_name), micro,
                  W.roofline(flops, moved, 0, facts.hardware, micro), frozenset({STUDENT_BACKWARD}))]


def plan_buffers(stage_name: str, config: Config, facts: StageFacts) -> list[Buffer]:
    """One layer's activation gradients at a time, or for a hybrid student the larger of those and a
    linear-attention layer's backward, which recomputes the torch core with autograd in pieces of whole sequences
    (sizing.linear_recompute_workspace_bytes: the step's sequences at most, as many as a micro-batch may pack), less
    what the backward has freed of the activations by the last such layer
    (sizing.freed_before_last_linear_core_bytes)."""
    shape, counts = facts.student_shape, facts.counts
    reference = facts.reference_tokens("student", counts.sequence_tokens)
    size = sizing.backward_workspace_bytes(shape, counts.micro_batch_tokens, facts.student_dtype_bytes,
                                           counts.sequences, counts.sequence_tokens,
                                           reference_sequence_tokens=reference,
                                           checkpointing=facts.activation_checkpointing)
    formula = f"micro-batch tokens x {facts.activation_label} (one layer's activation grads)"
    keys = (*facts.micro_keys, *facts.student_keys)
    if shape.linear_layers:
        formula = (f"max({formula}, a linear-attention layer's backward (its torch core recomputed with autograd in "
                   f"pieces of <= {sizing.LINEAR_RECOMPUTE_PADDED_TOKENS} padded tokens: the largest piece's graph, "
                   f"the micro-batch's gradients around the core) - the activations freed before the last "
                   f"linear-attention layer's core (linear_recompute_workspace_bytes, "
                   f"freed_before_last_linear_core_bytes in opdgraph/sizing.py))")
        keys = (*keys, "data.prompts_per_step", "data.samples_per_prompt",
                facts.setting_keys["activation_checkpointing"])
    return [buffer(facts.local(f"{stage_name}.workspace"), "workspace", size, keys, formula=formula)]


def bind(stage_name: str, config: Config, run) -> dict:
    return {"student": run.student}


def execute(step, config: Config, inputs: StageInputs) -> None:
    from opdgraph.runtime import training

    training.backward(inputs)
