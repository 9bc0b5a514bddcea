"""Decoder building blocks shared by every family: RMSNorm, gated MLP, attention, and the decoder layer.

Family differences are the explicit options of DecoderConfig (see config.py); there is no per-family subclass.
Submodule and parameter names follow the Hugging Face checkpoints (q_proj, input_layernorm, ...) so a state dict
maps onto HF tensor names by adding a prefix. Tensors are packed: [T, ...] with no batch dimension.

The packed forward's norms, RoPE and gated activation go through the LayerKernels passed in (layer_kernels.py:
torch's autograd Functions that save only the input and the fp32 rstd per norm, gate and up per MLP, or
Liger-Kernel's fused kernels that save the same); the norm that follows a residual add takes (x, residual) and
returns (normed, x + residual).
A linear-attention layer (Qwen3.5) has a GatedDeltaNet (gated_deltanet.py) as its token mixer instead of attention;
its ``attend`` argument is then the model's bound linear-attention core. Qwen3.5's attention also gates its output
(q_proj yields q and a gate per head) and rotates part of each head only.
The ``forward_fused`` methods are the rollout forward's variant (DecoderLM.use_fused_decode_kernels): the same math
through the Triton kernels of kernels/fused_decode.py, with RoPE and the K/V cache write in one kernel.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from opdgraph.kernels import fused_decode
from opdgraph.models.config import LINEAR_ATTENTION, SLIDING_ATTENTION, DecoderConfig
from opdgraph.models.gated_deltanet import GatedDeltaNet
from opdgraph.models.layer_kernels import TORCH, LayerKernels

# (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], sliding_window) -> [T, Hq, D]; the model binds metadata, cache, scale.
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "int | None"], torch.Tensor]
# (rotated q [T, Hq, D], sliding_window) -> [T, Hq, D] over a cache that already holds this forward's K/V.
AttendCachedFn = Callable[[torch.Tensor, "int | None"], torch.Tensor]


class RMSNorm(nn.Module):
    """RMSNorm normalising in float32.

    Standard form (Llama/Qwen): the normalised value is cast back to the input dtype, then scaled by w.
    One-plus form (Gemma): w is stored as an offset from 1 and the scaling happens in float32 before the cast.
    """

    def __init__(self, dim: int, eps: float, one_plus: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.one_plus = one_plus

    def reset_parameters(self) -> None:
        if self.one_plus:
            nn.init.zeros_(self.weight)
        else:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, kernels: LayerKernels = TORCH) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.one_plus)

    def forward_with_residual(self, x: torch.Tensor, residual: torch.Tensor,
                              kernels: LayerKernels = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x), the add inside the norm's autograd Function."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps, self.one_plus)

    def forward_fused(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Triton: (RMSNorm(residual + x), residual + x); without a residual, (RMSNorm(x), x)."""
        if residual is None:
            return fused_decode.rms_norm(x, self.weight, self.eps, self.one_plus), x
        return fused_decode.fused_add_rms_norm(x, residual, self.weight, self.eps, self.one_plus)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with SiLU (Llama/Qwen) or tanh-approximated GELU (Gemma)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.activation = config.activation
        # (weight [2 I, H], bias or None): gate_proj and up_proj as one projection, a view of their own storage
        # when pack_gate_up put them back to back (installed by DecoderLM.install_fused_gate_up). Not a parameter.
        self.fused_gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, kernels: LayerKernels = TORCH) -> torch.Tensor:
        return self.down_proj(kernels.gated_activation(self.gate_proj(x), self.up_proj(x), self.activation))

    @torch.no_grad()
    def pack_gate_up(self) -> None:
        """Move gate_proj's and up_proj's weights (and biases) into one [2 I, ...] storage, gate first; the
        parameters stay (same objects, same values), only their ``.data`` points at halves of it. Whoever holds the
        old tensors (an fp32 optimizer master aliases its parameter's storage) would not follow: pack first."""
        for name in ("weight", "bias"):
            gate, up = getattr(self.gate_proj, name), getattr(self.up_proj, name)
            if gate is None:
                continue
            packed = torch.cat([gate, up])
            gate.data, up.data = packed[: gate.shape[0]], packed[gate.shape[0]:]

    def packed_gate_up(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The stacked (weight, bias) viewing both projections' storage if they sit back to back (pack_gate_up;
        loading, sharding or a device move each give parameters their own storage again), else None."""
        weight = _back_to_back(self.gate_proj.weight, self.up_proj.weight)
        if weight is None or self.gate_proj.bias is None:
            return None if weight is None else (weight, None)
        bias = _back_to_back(self.gate_proj.bias, self.up_proj.bias)
        return None if bias is None else (weight, bias)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        activation = "silu" if self.activation == "silu" else "gelu_tanh"
        if self.fused_gate_up is not None:  # one matmul; the activation reads both halves as strided views
            gate_up = F.linear(x, *self.fused_gate_up)
            inner = gate_up.shape[-1] // 2
            return self.down_proj(fused_decode.gated_activation(gate_up[..., :inner], gate_up[..., inner:],
                                                                activation))
        return self.down_proj(fused_decode.gated_activation(self.gate_proj(x), self.up_proj(x), activation))


def _back_to_back(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor | None:
    """[first; second] as a view of their shared storage when second starts where contiguous first ends."""
    if not (first.is_contiguous() and second.is_contiguous() and first.dtype == second.dtype
            and first.device == second.device and first.shape[1:] == second.shape[1:]
            and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
            and second.data_ptr() == first.data_ptr() + first.numel() * first.element_size()):
        return None
    return first.detach().as_strided((first.shape[0] + second.shape[0], *first.shape[1:]), first.stride())


class Attention(nn.Module):
    """Projections, optional q/k norm, RoPE; the attention itself is delegated to the bound backend call."""

    def __init__(self, config: DecoderConfig, sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.sliding_window = sliding_window
        self.output_gate = config.attention_output_gate
        hidden = config.hidden_size
        q_width = self.num_heads * self.head_dim * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(hidden, q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.one_plus_norm)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.one_plus_norm)
        else:
            self.q_norm = self.k_norm = None
        # (weight [q + 2 kv, H], bias or None): a rollout-time copy of q/k/v_proj stacked, used by forward_fused
        # while set (the engine installs its own copies during generate: DecoderLM.stack_qkv). Not a parameter.
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @torch.no_grad()
    def stack_qkv(self, into: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """(weight, bias) of q/k/v_proj stacked; written in place into `into` when given (its address stays
        fixed, which CUDA graphs captured on it need)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if into is None:
            weight = torch.empty(sum(p.weight.shape[0] for p in projections), self.q_proj.weight.shape[1],
                                 dtype=self.q_proj.weight.dtype, device=self.q_proj.weight.device)
            into = (weight, None if self.q_proj.bias is None else weight.new_empty(weight.shape[0]))
        torch.cat([p.weight for p in projections], out=into[0])
        if into[1] is not None:
            torch.cat([p.bias for p in projections], out=into[1])
        return into

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn,
                kernels: LayerKernels = TORCH) -> torch.Tensor:
        num_tokens = x.shape[0]
        gate = None
        if self.output_gate:  # per head: head_dim query values, then head_dim gate values
            q, gate = self.q_proj(x).view(num_tokens, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            # q's own copy: the q norm saves its input, and a view would keep all of q_proj's output (q and gate)
            # alive for backward; the fused kernels copy a strided input anyway (sizing.py: Qwen3.5)
            q = q.contiguous()
        else:
            q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q, kernels), self.k_norm(k, kernels)
        q, k = kernels.rotary(q, k, cos, sin)
        out = attend(q, k, v, self.sliding_window).reshape(num_tokens, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(num_tokens, self.num_heads * self.head_dim))
        return self.o_proj(out)

    def forward_fused(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      kv_cache: torch.Tensor, slot_mapping: torch.Tensor, attend: AttendCachedFn) -> torch.Tensor:
        """Rollout forward with Triton kernels: q/k norm, RoPE and the K/V cache write in one kernel, then attention."""
        num_tokens = x.shape[0]
        if self.fused_qkv is not None:  # one projection instead of three (views into its output, no copies)
            qkv = F.linear(x, *self.fused_qkv)
            q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q = qkv[:, :q_width].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_width : q_width + kv_width].view(num_tokens, self.num_kv_heads, self.head_dim)
            v = qkv[:, q_width + kv_width :].view(num_tokens, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        norms = {}
        if self.q_norm is not None:
            norms = dict(q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight,
                         norm_eps=self.q_norm.eps, norm_one_plus=self.q_norm.one_plus)
        q = fused_decode.rope_and_store_kv(q, k, v, positions, inv_freq, kv_cache, slot_mapping, **norms)
        out = attend(q, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm residual block; with sandwich norms (Gemma 3) each sublayer's output is normed before the residual."""

    def __init__(self, config: DecoderConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        window = config.sliding_window if layer_type == SLIDING_ATTENTION else None
        if layer_type == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config, window)
        self.mlp = GatedMLP(config)

        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, config.one_plus_norm)

        self.input_layernorm = norm()
        # Llama/Qwen name their pre-MLP norm post_attention_layernorm; Gemma 3 uses that name for the norm applied
        # to the attention output and calls the pre-MLP norm pre_feedforward_layernorm.
        self.post_attention_layernorm = norm()
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.sandwich_norms = config.sandwich_norms

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn,
                kernels: LayerKernels = TORCH) -> torch.Tensor:
        if self.layer_type == LINEAR_ATTENTION:  # attend is the bound linear-attention core; no RoPE
            attention_out = self.linear_attn(self.input_layernorm(hidden, kernels), attend)
        else:
            attention_out = self.self_attn(self.input_layernorm(hidden, kernels), cos, sin, attend, kernels)
        if self.sandwich_norms:
            normed, hidden = self.pre_feedforward_layernorm.forward_with_residual(
                self.post_attention_layernorm(attention_out, kernels), hidden, kernels)
            return hidden + self.post_feedforward_layernorm(self.mlp(normed, kernels), kernels)
        normed, hidden = self.post_attention_layernorm.forward_with_residual(attention_out, hidden, kernels)
        return hidden + self.mlp(normed, kernels)

    def forward_fused(self, pending: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                      inv_freq: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      attend: AttendCachedFn) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with Triton kernels, the residual stream carried as residual + pending (pending: the last
        sublayer's output, not yet added; residual None before the first layer). Returns the new (pending,
        residual); each add happens inside the next norm's kernel, in the order torch adds."""
        normed, residual = self.input_layernorm.forward_fused(pending, residual)
        attention_out = self.self_attn.forward_fused(normed, positions, inv_freq, kv_cache, slot_mapping, attend)
        if self.sandwich_norms:
            attention_out = self.post_attention_layernorm.forward_fused(attention_out)[0]
            normed, residual = self.pre_feedforward_layernorm.forward_fused(attention_out, residual)
            return self.post_feedforward_layernorm.forward_fused(self.mlp.forward_fused(normed))[0], residual
        normed, residual = self.post_attention_layernorm.forward_fused(attention_out, residual)
        return self.mlp.forward_fused(normed), residual
