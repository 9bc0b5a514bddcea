"""Two-stage backward: finish the student's backward from the chunked loss's analytic gradients.

The loss stage runs the student backbone with autograd up to its final hidden states, detaches them, and calls
``divergence.chunked_divergence``, which returns dLoss/dhidden and accumulates dLoss/dlm_head in fp32 without ever
holding full logits. This module is the second stage: one ``hidden.backward(hidden_grad)`` through the backbone,
then the lm_head gradient is added into the lm_head parameter's ``.grad``. With tied embeddings the lm_head IS the
embedding weight, so its ``.grad`` already holds the embedding (input-side) gradient from the backbone and the two
add up, exactly as a dense backward over full logits would.
"""

from __future__ import annotations

import torch


def two_stage_backward(
    hidden: torch.Tensor, hidden_grad: torch.Tensor, lm_head_param: torch.nn.Parameter, lm_head_grad: torch.Tensor
) -> None:
    """Backpropagate hidden_grad through the backbone, then add the fp32 lm_head_grad into lm_head_param.grad.

    The sum is formed in fp32 and rounded once to the parameter dtype, so a bf16 tied embedding does not lose the
    smaller of its two contributions to a double rounding. lm_head_grad is this call's contribution only: it is
    copied, never aliased, so the caller may zero and reuse it for the next micro-batch.
    """
    hidden.backward(hidden_grad)
    add_lm_head_grad(lm_head_param, lm_head_grad)


def add_lm_head_grad(lm_head_param: torch.nn.Parameter, lm_head_grad: torch.Tensor) -> None:
    """lm_head_param.grad += lm_head_grad, summed in fp32 and rounded once to the parameter dtype (copied, never
    aliased)."""
    if lm_head_param.grad is None:
        lm_head_param.grad = lm_head_grad.to(lm_head_param.dtype, copy=True)
    else:
        lm_head_param.grad.copy_(lm_head_param.grad.float() + lm_head_grad)
