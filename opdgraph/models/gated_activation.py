"""The gated MLP's activation as the training forward runs it: act(gate) * up, saving only gate and up.

Autograd of the plain expression saves gate (for act's backward), act(gate) and up (for the product's backward),
and down_proj saves the product: 4 i x d per token. ``GatedActivationFunction`` saves gate and up and recomputes
act(gate) in backward (one elementwise pass), so the MLP costs 3 i x d per token, as Liger-Kernel's fused kernel
does (kernels/liger_layers.py): the plan's activation sizing (sizing.py) is the same whichever of the two runs.

Numerics are the plain expression's, forward and backward: act in the model dtype as torch computes it, then the
product; in backward d up = g * act(gate) and d gate = torch's own silu/gelu backward of g * up, the products
autograd of the plain expression computes, in the same dtypes (bit-identical gradients). Under no_grad (teacher
scoring) ``gated_activation`` is the plain expression, nothing saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh")  # SiLU (Llama, Qwen) and tanh-approximated GELU (Gemma)


def activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")


class GatedActivationFunction(torch.autograd.Function):
    """act(gate) * up, saving gate and up."""

    @staticmethod
    def forward(ctx, gate, up, activation: str):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return activate(gate, activation) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * activate(gate, ctx.activation)
        if ctx.activation == "silu":
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        else:
            grad_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
        return grad_gate, grad_up, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up. Without a graph the caller's gate must be a temporary (GatedMLP passes gate_proj's output):
    it is dropped once act(gate) exists and the product is formed in place, so at most three [T, i] tensors are
    alive (the forward workspace of sizing.py), as when the model wrote gate = act(gate)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return GatedActivationFunction.apply(gate, up, activation)
    activated = activate(gate, activation)
    del gate
    return activated.mul_(up)
