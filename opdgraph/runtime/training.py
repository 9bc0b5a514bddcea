"""The training side of one OPD step, as small functions the stage modules call: teacher scoring, the chunked loss,
the two-stage backward and the optimizer step.

Two-stage backward: the student backbone runs forward once per micro-batch and keeps its graph; the loss then works
on *detached* final hidden states in fixed chunks (logits of one chunk at a time, never [tokens x vocab]), producing
dLoss/dhidden and the lm_head gradient analytically; finally one backward through the backbone with that hidden-state
gradient. The lm_head gradient is accumulated in fp32 across micro-batches and added to the parameter's gradient
before the optimizer step (for tied embeddings it joins the embedding's own gradient there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdgraph.runtime.batches import MicroBatch


@dataclass
class LossSettings:
    divergence: str
    beta: float
    temperature: float
    chunk_tokens: int
    kernel: str  # "torch" | "triton" | "auto"


@torch.no_grad()
def teacher_hidden_at_loss_positions(teacher, batch: MicroBatch) -> torch.Tensor:
    """Teacher final hidden states [N, Ht] at the trained positions; the full [T, Ht] output is dropped at once."""
    hidden = teacher.forward_hidden(batch.input_ids, batch.positions, batch.meta)
    return hidden.index_select(0, batch.loss_positions)


def student_forward(student, batch: MicroBatch, *, activation_checkpointing: bool) -> torch.Tensor:
    """Student final hidden states [T, Hs] with the autograd graph kept for the backward."""
    return student.forward_hidden(batch.input_ids, batch.positions, batch.meta,
                                  activation_checkpointing=activation_checkpointing)


def _use_triton(kernel: str, device: torch.device) -> bool:
    if kernel == "torch":
        return False
    from opdgraph.kernels.divergence import triton_available

    available = device.type == "cuda" and triton_available()
    if kernel == "triton" and not available:
        raise RuntimeError("loss.kernel = 'triton' needs a CUDA device with triton installed; use 'auto' or 'torch'")
    return available


def chunked_loss(student, teacher, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, batch: MicroBatch,
                 settings: LossSettings, lm_head_grad: torch.Tensor):
    """Loss of one micro-batch over its trained positions, in chunks; returns the divergence result.

    `student_hidden` is the [T, Hs] backbone output; only its rows at the loss positions are read, detached.
    """
    hidden = student_hidden.detach().index_select(0, batch.loss_positions)
    common = dict(divergence=settings.divergence, beta=settings.beta, temperature=settings.temperature,
                  chunk_tokens=settings.chunk_tokens, sampled_ids=batch.target_ids, lm_head_grad=lm_head_grad)
    if _use_triton(settings.kernel, hidden.device):
        from opdgraph.kernels.divergence import chunked_fused_divergence as divergence_fn
    else:
        from opdgraph.train.divergence import chunked_divergence as divergence_fn
    return divergence_fn(hidden, student.lm_head_weight.detach(), teacher_hidden, teacher.lm_head_weight.detach(),
                         batch.weights, **common)


def backward_through_backbone(student_hidden: torch.Tensor, batch: MicroBatch, hidden_grad: torch.Tensor) -> None:
    """Second stage: one backward pass with the hidden-state gradient scattered to the trained rows."""
    full_grad = torch.zeros_like(student_hidden)
    full_grad.index_copy_(0, batch.loss_positions, hidden_grad.to(student_hidden.dtype))
    student_hidden.backward(full_grad)


def add_lm_head_grad(student, lm_head_grad: torch.Tensor) -> None:
    """Fold the fp32 lm_head gradient into the parameter's gradient (tied: adds to the embedding's)."""
    weight = student.lm_head_weight
    grad = lm_head_grad.to(weight.dtype)
    if weight.grad is None:
        weight.grad = grad
    else:
        weight.grad.add_(grad)
