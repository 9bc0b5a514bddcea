"""Where the two largest held states live during a training step: the plan option the fit search decides.

- teacher_weights: "keep" (on the device throughout), "offload" (pinned host memory outside the training loop:
  reloaded once before the first teacher_score, dropped after the loop; the host copy stays current because the
  teacher is never written), or "stream" (the embedding, final norm and lm_head are handled as "offload"; the layers
  stay in host memory and are copied in one at a time during teacher scoring, the next one prefetched), or "shard"
  (several ranks only: FSDP2 splits the weights N ways; teacher scoring all-gathers one layer at a time, the next
  one prefetched, and the root -- embedding, final norm, lm_head -- until the loss has read the lm_head).
- optimizer_state: "keep" (fp32 masters and AdamW moments on the device), or "offload" (they live in pinned host
  memory and the optimizer step streams them through the device bucket by bucket: copy in, update, copy out).
- student_gather (several ranks only; the student's FSDP2 schedule): "step" (the student is all-gathered once per
  training step, for rollout, and stays whole through the training micro-batches; gradients accumulate whole and are
  reduce-scattered once, in the last micro-batch's backward: per rank P x d of weights and P x d of gradients more
  during training, and no communication inside the loop) or "layer" (FSDP's default: every micro-batch's forward
  and backward all-gather one layer at a time and every backward reduce-scatters its gradients: least memory, three
  exchanges of the student per micro-batch). One process ignores it.

The compiler (opdgraph.compile, opdgraph.buffers) turns a Placement into buffers and transfers; the runtime
(opdgraph.runtime.offload) executes the same placement. Without a fit search, the placement comes from the config
(`models.<teacher>.offload_when_idle`).
"""

from __future__ import annotations

from typing import Literal

import attrs


@attrs.frozen(kw_only=True)
class Placement:
    teacher_weights: Literal["keep", "offload", "stream", "shard"] = "keep"
    optimizer_state: Literal["keep", "offload"] = "keep"
    student_gather: Literal["step", "layer"] = "step"


def configured_placement(cfg) -> Placement:
    """The placement a pipeline asks for without any search."""
    teachers = [model for model in cfg.models.values() if model.role == "teacher"]
    gather = cfg.pipeline.fit.student_gather
    offload = bool(teachers) and all(teacher.offload_when_idle for teacher in teachers)
    return Placement(teacher_weights="offload" if offload else "keep",
                     student_gather="step" if gather == "auto" else gather)
