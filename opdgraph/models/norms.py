"""RMSNorm as the training forward runs it: an autograd Function that keeps only the input and the fp32 rstd.

Autograd of the plain formula (upcast, mean of squares, rsqrt, scale, cast) saves the fp32 upcast, the reciprocal
rms and the normalised value besides what the next op saves: 6 h + 4 bytes per row more than the bf16 input for a
width-h norm. Like fused-kernel libraries, ``RMSNormFunction`` saves the input x (model dtype) and rstd (fp32, one
per row) and recomputes the normalised value in backward, so a norm costs h x d + 4 bytes per row of saved memory.
``AddRMSNormFunction`` is the same norm after a residual add: it takes (x, residual) and returns (normed, x +
residual), saving only the sum (which the residual stream needs anyway) and rstd.

Forward numerics are ``rms_norm_forward``, the exact op sequence the model always ran (bit-identical outputs in
fp32 and bf16: tests/test_models_parity.py compares with Hugging Face transformers). The backward is the gradient
of that formula computed in fp32, with the cast treated as the identity, as autograd does.

Two forms (``one_plus``):
- standard (Llama/Qwen): y = w * cast(x * rstd), w in the model dtype;
- one-plus (Gemma): y = cast(x * rstd * (1 + w)), scaled in fp32 before the cast.
With rows r (every dim but the last) and n = x * rstd in fp32, g the output gradient and s = (1 + w) or w:
    dx = rstd * (g s - n * mean(g s n)),   dw = sum_r g * n  (standard: n cast to the model dtype first).

Under no_grad (teacher scoring, rollout) the functions below call ``rms_norm_forward`` directly: no Function,
nothing saved. The GPU rollout's Triton norms (kernels/fused_decode.py) are a separate path; Liger-Kernel's fused
norms (models.<name>.kernels = "liger", layer_kernels.py) save the same two tensors.
"""

from __future__ import annotations

import torch


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     one_plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised and scaled x in x's dtype, rstd fp32 [..., 1]) over the last dim."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = x32 * rstd
    if one_plus:
        return (normed * (1.0 + weight.float())).to(x.dtype), rstd
    return weight * normed.to(x.dtype), rstd


def _norm_backward(grad_out, x, weight, rstd, one_plus):
    """(dx fp32, dw in weight's dtype) of rms_norm_forward (module docstring)."""
    normed = x.float() * rstd
    grad = grad_out.float()
    scale = 1.0 + weight.float() if one_plus else weight.float()
    grad_normed = grad * scale
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    scaled_by = normed if one_plus else normed.to(x.dtype).float()
    grad_weight = (grad * scaled_by).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x, grad_weight


class RMSNormFunction(torch.autograd.Function):
    """rms_norm_forward(x, ...)[0], saving x and rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, one_plus: bool):
        out, rstd = rms_norm_forward(x, weight, eps, one_plus)
        ctx.save_for_backward(x, weight, rstd)
        ctx.one_plus = one_plus
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _norm_backward(grad_out, x, weight, rstd, ctx.one_plus)
        return grad_x.to(x.dtype), grad_weight, None, None


class AddRMSNormFunction(torch.autograd.Function):
    """(rms_norm_forward(residual + x, ...)[0], residual + x), saving the sum and rstd."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps: float, one_plus: bool):
        total = residual + x
        out, rstd = rms_norm_forward(total, weight, eps, one_plus)
        ctx.save_for_backward(total, weight, rstd)
        ctx.one_plus = one_plus
        return out, total

    @staticmethod
    def backward(ctx, grad_out, grad_total):
        total, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = _norm_backward(grad_out, total, weight, rstd, ctx.one_plus)
        # The sum's own gradient (the residual stream's) joins in fp32: one rounding instead of two.
        grad = (grad_x + grad_total.float()).to(total.dtype)
        return grad, grad, grad_weight, None, None


def _needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, one_plus: bool) -> torch.Tensor:
    if _needs_graph(x, weight):
        return RMSNormFunction.apply(x, weight, eps, one_plus)
    return rms_norm_forward(x, weight, eps, one_plus)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 one_plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x)."""
    if _needs_graph(x, residual, weight):
        return AddRMSNormFunction.apply(x, residual, weight, eps, one_plus)
    total = residual + x
    return rms_norm_forward(total, weight, eps, one_plus)[0], total
