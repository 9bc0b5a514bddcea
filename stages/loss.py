"""Loss stage: full-vocabulary divergence between student and teacher next-token distributions, in chunks.

Reads `responses` and `teacher_hidden`, writes `hidden_grad` (the gradient w.r.t. the student's final hidden
states). Logits exist only for `chunk_tokens` positions at a time.
"""

from __future__ import annotations

from typing import Literal

import attrs

from opdgraph.config.fields import positive, setting, unit_interval

READS = ("responses", "teacher_hidden")
WRITES = ("hidden_grad",)


@attrs.frozen(kw_only=True)
class Config:
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "sampled_token"] = setting(
        help="forward_kl: KL(teacher||student); reverse_kl: KL(student||teacher); jsd: generalised JSD(beta); "
             "sampled_token: reverse KL estimated on the sampled token only")
    beta: float = setting(0.5, help="jsd only: mixture weight, strictly between 0 and 1", check=unit_interval)
    temperature: float = setting(1.0, help="softmax temperature applied to both logits", check=positive)
    chunk_tokens: int = setting(1024, help="positions whose logits are materialised at once", check=positive)
    normalize: Literal["token", "sequence"] = setting("token", help="average over all tokens, or per sequence first")
    kernel: Literal["auto", "torch", "triton"] = setting("auto", help="divergence implementation")
    allow_biased_estimate: bool = setting(
        False, help="sampled_token only: accept rollouts that are not plain samples at the loss temperature (top_k, "
                    "top_p, min_p, greedy, another temperature), knowing the estimate is then biased")

    def cross_problems(self):
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            if self.beta in (0, 1):
                limit = "forward_kl" if self.beta == 0 else "reverse_kl"
                yield "beta", (f"jsd needs 0 < beta < 1, got {self.beta!r}; at beta = {self.beta:g} JSD degenerates "
                               f"to zero -- use divergence = \"{limit}\" for that limit")
            else:
                yield "beta", f"jsd needs 0 < beta < 1, got {self.beta!r}"


def execute(step, config: Config, ctx, loop) -> None:
    from opdgraph.runtime import training

    if step.name.endswith(".student_forward"):
        # Fused plan: this forward keeps the graph for the backward; unfused: the backward stage re-runs it.
        training.student_forward(ctx, loop, keep_graph="student_activations" in step.writes, write_hidden=True)
    else:
        training.chunked_loss(config, ctx, loop)
