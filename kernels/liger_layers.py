"""Liger-Kernel's fused Triton kernels as the decoder's LayerKernels (opdgraph.models.layer_kernels): RMSNorm, the
residual add fused into the next RMSNorm, RoPE and the gated activation, each one kernel forward and one backward.

Liger-Kernel (github.com/linkedin/Liger-Kernel) is pure Triton; its autograd Functions are used as published:
- ``LigerRMSNormFunction`` / ``LigerFusedAddRMSNormFunction``, casting mode "llama" for the standard norm (fp32
  rstd, the normalised value cast to the model dtype, then scaled: norms.py's standard form) and "gemma" with offset
  1 for the one-plus form (all fp32, cast last). They save the input (the sum for the fused add) and the fp32 rstd
  per row, as norms.py's Functions do. ``in_place=False``: a norm's output gradient can be the same tensor as the
  residual stream's (Gemma's post-norms feed residual adds; the final norm's is the loss's hidden_grad), which an
  in-place backward would overwrite.
- ``LigerRopeFunction``: rotate-half layout, the rotated width taken from cos/sin (Qwen3.5's partial RoPE). It takes
  [B, H, T, D] views of [B, T, H, D] storage; the packed [T, H, D] tensors are viewed so. It rotates q and k in
  place (contiguous inputs; a strided one is copied first) and saves only cos and sin; q and k are the q/k_proj
  (or q/k norm) outputs, which nothing else saves, so the in-place write is safe.
- ``LigerSiLUMulFunction`` / ``LigerGELUMulFunction``: act(gate) * up, saving gate and up (act recomputed in
  backward), like gated_activation.py's Function.

Numerics: the same formulas in float32 where the torch path computes in float32, with a different summation order
for the mean of squares and the dw sums, RoPE's products formed in the model dtype; tests/test_layer_kernels.py
compares both with float64 on tiny odd shapes, forward and backward (on CPU under TRITON_INTERPRET=1).
The fused add's backward kernel takes rows per program as a compile-time constant: each new micro-batch length
(rounded to a multiple of the GPU's SM count) compiles once, then comes from Triton's cache.
liger_kernel is imported lazily (it imports triton and its whole op collection).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def liger_import_error() -> str | None:
    """None when liger_kernel's ops import, else the error's text."""
    try:
        import liger_kernel.ops  # noqa: F401
    except Exception as error:  # an ImportError, or a broken triton install under it
        return f"{type(error).__name__}: {error}"
    return None


def _casting(one_plus: bool) -> tuple[float, str]:
    """(offset, casting mode) of Liger's norms for our two forms (module docstring)."""
    return (1.0, "gemma") if one_plus else (0.0, "llama")


class LigerLayerKernels:
    name = "liger"

    def __init__(self):
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        self._norm, self._add_norm, self._rope = LigerRMSNormFunction, LigerFusedAddRMSNormFunction, LigerRopeFunction
        self._activations = {"silu": LigerSiLUMulFunction, "gelu_tanh": LigerGELUMulFunction}

    def rms_norm(self, x, weight, eps, one_plus):
        offset, casting = _casting(one_plus)
        return self._norm.apply(x, weight, eps, offset, casting, False)

    def add_rms_norm(self, x, residual, weight, eps, one_plus):
        offset, casting = _casting(one_plus)
        return self._add_norm.apply(x, residual, weight, eps, offset, casting, False)

    def rotary(self, q, k, cos, sin):
        q, k = self._rope.apply(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), cos, sin)
        return q.transpose(1, 2).squeeze(0), k.transpose(1, 2).squeeze(0)

    def gated_activation(self, gate, up, activation):
        return self._activations[activation].apply(gate, up)
