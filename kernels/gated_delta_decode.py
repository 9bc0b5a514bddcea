"""One decode step of Qwen3.5's gated delta rule for B sequences, updating their recurrent states in place.

A decode step reads and writes each running sequence's delta-rule state (value heads x key dim x value dim, float32:
1 MiB per layer and sequence at Qwen3.5-0.8B's widths, more than the weights per step at batch 64 and over). A
gather of the slots, a kernel that returns new states and a scatter back move each state four times or more; this
kernel moves it twice: it reads the state at ``slots[b]`` (zeros where ``continuing[b]`` is false: a row that starts
its sequence, a padding row), applies the step of models/delta_rule.recurrent_step (L2-normalised q and k, q times
``scale``, value head h reading key head h // (H / Hk)) and writes the state back at the same slot. Rows of one step
must hold distinct slots, except rows whose results are dropped (padding and idle rows share the scratch slot).

``gated_delta_decode_(convolved, decay, beta, state, slots, continuing, dims)``: convolved [B, C] (the conv step's
output: q | k | v), decay [B, H] float32 log decays, beta [B, H], state [slots, H, K, V] float32 (updated in place),
slots int64 [B], continuing bool [B] -> out [B, H, V] in convolved's dtype. No host synchronisation (CUDA-graph
capturable). Triton is imported lazily; the body is in gated_delta_decode_triton.py. Float32 math as the reference,
up to the order of the two K-long sums.
"""

from __future__ import annotations

import torch

from opdgraph.models.delta_rule import L2_EPS

VALUE_BLOCK = 32  # values per program: K x 32 fp32 of state in registers (128 x 32 at Qwen3.5's widths)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def gated_delta_decode_(convolved, decay, beta, state, slots, continuing, dims) -> torch.Tensor:
    from opdgraph.kernels import gated_delta_decode_triton as body

    rows = convolved.shape[0]
    if convolved.stride(-1) != 1:
        convolved = convolved.contiguous()
    out = torch.empty(rows, dims.value_heads, dims.value_dim, dtype=convolved.dtype, device=convolved.device)
    if rows == 0:
        return out
    value_block = min(VALUE_BLOCK, _next_power_of_2(dims.value_dim))
    grid = (rows, dims.value_heads, -(-dims.value_dim // value_block))
    body.gated_delta_decode_kernel[grid](
        convolved, convolved.stride(0), decay.float().contiguous(), beta.contiguous(), state, slots.contiguous(),
        continuing.to(torch.int8), out, dims.key_dim ** -0.5, H=dims.value_heads, HK=dims.key_heads, K=dims.key_dim,
        V=dims.value_dim, BK=_next_power_of_2(dims.key_dim), BV=value_block, L2_EPS=L2_EPS)
    return out
