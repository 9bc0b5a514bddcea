"""Triton body of the in-place gated delta rule decode step; only `opdgraph.kernels.gated_delta_decode` imports it.

Legend: B rows (one token each), H value heads, Hk key heads, K key dim, V value dim, BK / BV their blocks.
"""

import triton
import triton.language as tl


@triton.jit
def gated_delta_decode_kernel(qkv_ptr, qkv_row_stride, decay_ptr, beta_ptr, state_ptr, slots_ptr, continuing_ptr,
                              out_ptr, scale, H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, L2_EPS: tl.constexpr):
    """One program per (row, value head, block of BV values): read the slot's state [K, BV] (zeros when the row
    starts its sequence), decay it, write the delta-rule update, read the output, store the state back in place."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    value_block = tl.program_id(2)
    key_head = head // (H // HK)
    keys = tl.arange(0, BK)
    values = value_block * BV + tl.arange(0, BV)
    key_mask, value_mask = keys < K, values < V

    base = qkv_ptr + row * qkv_row_stride
    q = tl.load(base + key_head * K + keys, mask=key_mask, other=0.0).to(tl.float32)
    k = tl.load(base + HK * K + key_head * K + keys, mask=key_mask, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * HK * K + head * V + values, mask=value_mask, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, 0) + L2_EPS) * scale
    k = k * tl.rsqrt(tl.sum(k * k, 0) + L2_EPS)
    decay = tl.exp(tl.load(decay_ptr + row * H + head).to(tl.float32))
    beta = tl.load(beta_ptr + row * H + head).to(tl.float32)

    slot = tl.load(slots_ptr + row).to(tl.int64)
    continuing = tl.load(continuing_ptr + row).to(tl.int32)
    offsets = ((slot * H + head) * K + keys[:, None]) * V + values[None, :]
    in_bounds = key_mask[:, None] & value_mask[None, :]
    # A row that starts its sequence reads nothing (zeros): the block mask ANDed with its flag, broadcast.
    state = tl.load(state_ptr + offsets, mask=in_bounds & (keys[:, None] * 0 + continuing > 0), other=0.0) * decay
    update = (v - tl.sum(state * k[:, None], 0)) * beta
    state = state + k[:, None] * update[None, :]
    out = tl.sum(state * q[:, None], 0)
    tl.store(state_ptr + offsets, state, mask=in_bounds)
    tl.store(out_ptr + (row * H + head) * V + values, out.to(out_ptr.dtype.element_ty), mask=value_mask)
