"""The gated-DeltaNet token mixer of Qwen3.5's linear-attention layers (the module; its core runs in a backend).

Per token x [h]: in_proj_qkv(x) -> a causal depthwise conv1d (kernel K, per sequence) -> SiLU -> q, k, v; beta =
sigmoid(in_proj_b(x)) and g = -exp(A_log) softplus(in_proj_a(x) + dt_bias) per value head; q and k L2-normalised,
each key head serving value_heads / key_heads value heads; the gated delta rule (delta_rule.py) gives o per value
head; o is RMS-normalised per head, scaled by its weight and by SiLU(in_proj_z(x)) (the gate), and out_proj maps it
back to h. Parameter names and shapes are Hugging Face's (conv1d.weight is [C, 1, K]), so checkpoints map by prefix.

The module computes the projections, g, beta and the gated norm; the core (conv, SiLU, split, normalisation, delta
rule: ``LinearCore``) is the call the model binds, as attention is: the packed training call keeps state inside each
sequence only; the paged rollout call reads and writes the per-sequence conv window and state of linear_state.py.
``linear_attention_backend.py`` holds the plain-torch core (CPU, and the reference); a GPU kernel plugs in there.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from opdgraph.models.config import DecoderConfig

# (mixed_qkv [T, C], conv weight [C, 1, K], g [T, Hv] fp32, beta [T, Hv], dims) -> o [T, Hv, Dv] in mixed's dtype
LinearCore = Callable[..., torch.Tensor]


@attrs.frozen
class LinearDims:
    """The widths of one gated-DeltaNet layer."""

    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    kernel: int

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_heads * self.key_dim + self.value_heads * self.value_dim


class CausalConv1d(nn.Module):
    """Holds the depthwise conv's weight under HF's name and shape; the backend applies it per sequence."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))


def gated_rms_norm_forward(x, gate, weight, eps):
    """weight * cast(x * rstd) * SiLU(gate), the product in float32 and cast back (the reference's op order)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return ((weight * (x32 * rstd).to(x.dtype)) * F.silu(gate.float())).to(x.dtype), rstd


class GatedRMSNormFunction(torch.autograd.Function):
    """gated_rms_norm_forward, saving x, gate and rstd only (the normalised value and SiLU(gate) are recomputed)."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        out, rstd = gated_rms_norm_forward(x, gate, weight, eps)
        ctx.save_for_backward(x, gate, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        gate32 = gate.float()
        silu = F.silu(gate32)
        grad = grad_out.float()
        scaled = normed.to(x.dtype).float()
        grad_weight = (grad * silu * scaled).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        sigmoid = torch.sigmoid(gate32)
        grad_gate = grad * weight.float() * scaled * sigmoid * (1 + gate32 * (1 - sigmoid))
        grad_normed = grad * silu * weight.float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_gate.to(gate.dtype), grad_weight, None


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head's output, scaled by a plain weight (initialised to ones) and gated by SiLU(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or gate.requires_grad or self.weight.requires_grad):
            return GatedRMSNormFunction.apply(x, gate, self.weight, self.eps)
        return gated_rms_norm_forward(x, gate, self.weight, self.eps)[0]


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear-attention token mixer (module docstring)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.dims = dims = LinearDims(config.linear_num_key_heads, config.linear_num_value_heads,
                                      config.linear_key_head_dim, config.linear_value_head_dim,
                                      config.linear_conv_kernel)
        hidden, value_width = config.hidden_size, dims.value_heads * dims.value_dim
        self.in_proj_qkv = nn.Linear(hidden, dims.conv_channels, bias=False)
        self.in_proj_z = nn.Linear(hidden, value_width, bias=False)
        self.in_proj_b = nn.Linear(hidden, dims.value_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, dims.value_heads, bias=False)
        self.conv1d = CausalConv1d(dims.conv_channels, dims.kernel)
        self.dt_bias = nn.Parameter(torch.empty(dims.value_heads))
        self.A_log = nn.Parameter(torch.empty(dims.value_heads))
        self.norm = GatedRMSNorm(dims.value_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(value_width, hidden, bias=False)

    @torch.no_grad()
    def reset_recurrence(self, generator: torch.Generator) -> None:
        """The initialisation transformers gives these two: dt_bias ones, A = exp(A_log) uniform in [0.01, 16)."""
        self.dt_bias.fill_(1.0)
        uniform = torch.rand(self.A_log.shape, generator=generator, device=generator.device)
        self.A_log.copy_((0.01 + uniform * (16 - 0.01)).log())

    def forward(self, x: torch.Tensor, core: LinearCore) -> torch.Tensor:
        num_tokens, dims = x.shape[0], self.dims
        beta = torch.sigmoid(self.in_proj_b(x))
        # In float32: exp(A_log) of a bf16 model could overflow a 16-bit product.
        decay = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        out = core(self.in_proj_qkv(x), self.conv1d.weight, decay, beta, dims)
        gate = self.in_proj_z(x).view(num_tokens, dims.value_heads, dims.value_dim)
        return self.out_proj(self.norm(out, gate).reshape(num_tokens, dims.value_heads * dims.value_dim))
