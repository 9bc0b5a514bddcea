"""Rotary position embeddings: inverse frequencies (default, linear, llama3 scaling) and their application to q/k.

Positions are explicit per token (packed and paged forwards both pass them), so the same tables serve training,
teacher scoring and decode. Numerics follow the reference implementation: inverse frequencies in float32 computed
on the CPU, angles in float32, cos/sin cast to the model dtype before they multiply q and k, rotate-half layout.
"""

from __future__ import annotations

import math

import torch

from opdgraph.models.config import RopeSpec


def inverse_frequencies(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """float32 [head_dim / 2] inverse frequencies, always computed on the CPU so every device sees the same bits."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    inv_freq = 1.0 / (spec.theta**exponents)
    if spec.rope_type == "linear":
        return inv_freq / spec.factor
    if spec.rope_type == "llama3":
        return _llama3_rescale(inv_freq, spec)
    return inv_freq


def _llama3_rescale(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Llama 3 long-context scaling: slow rotations are divided by `factor`, fast ones kept, the band between blended.

    A rotation counts as slow when its wavelength exceeds original_max_position_embeddings / low_freq_factor, as fast
    when it is below original_max_position_embeddings / high_freq_factor.
    """
    context = spec.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    slow = wavelength > context / spec.low_freq_factor
    fast = wavelength < context / spec.high_freq_factor
    scaled = torch.where(slow, inv_freq / spec.factor, inv_freq)
    # Blend weight 0 at the slow edge of the band, 1 at the fast edge.
    blend = (context / wavelength - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    blended = (1 - blend) * scaled / spec.factor + blend * scaled
    return torch.where(~slow & ~fast, blended, scaled)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] for integer positions [T], in `dtype`."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by per-token angles; cos/sin are [T, rotated dims] (rotate-half layout). With
    fewer rotated dims than head_dim (Qwen3.5's partial RoPE) the first ones rotate and the rest pass through."""
    if cos.shape[-1] < x.shape[-1]:
        rotated = cos.shape[-1]
        return torch.cat((apply_rotary(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated_half * sin[:, None, :]
