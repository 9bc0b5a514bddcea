"""Triton bodies of the fused rollout-forward kernels; only `opdgraph.kernels.fused_decode` imports this module.

Every result is computed in float32 and rounded to the model dtype exactly where torch rounds it in the plain path
(after each elementwise op), so the fused forward reproduces the unfused one. Rounding to bfloat16 and encoding to
float8_e4m3fn use integer ops on the float32 bit pattern rather than Triton's casts: the CPU interpreter's casts
truncate instead of rounding to nearest even, and one code path means the interpreter tests check the GPU code.

- ``add_rms_norm_kernel``: one program per row; optional residual add, then RMSNorm (standard or one-plus form).
- ``rope_store_kv_kernel``: program (t, h) rotates query head h of token t, or (h >= Hq) rotates key head h - Hq and
  stores it together with the matching value head into the paged cache at slot_mapping[t]; with HAS_QK_NORM the
  head is RMSNormed (q_norm / k_norm) before it is rotated.
- ``gated_activation_kernel``: act(gate) * up over blocks of one row.

Legend: T = tokens, N = row length (hidden size or head_dim), Hq / Hkv = query / kv heads, D = head_dim,
HALF = D / 2, I = MLP inner size. ROUNDING: 0 float32, 1 bfloat16, 2 float16 (the model dtype).
"""

import triton
import triton.language as tl

FLOAT8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn; larger values (inf too) saturate to it
FLOAT8_MIN_NORMAL = tl.constexpr(0.015625)  # 2**-6


@triton.jit
def _round(x, ROUNDING: tl.constexpr):
    """float32 -> float32 holding the nearest value of the model dtype (ties to even), as a torch op's store."""
    rounded = x
    if ROUNDING == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif ROUNDING == 2:
        rounded = x.to(tl.float16).to(tl.float32)
    return rounded


@triton.jit
def _float8_e4m3fn_bits(x):
    """float32 -> uint8 float8_e4m3fn pattern of a saturating cast: nearest even, saturating at 448 (inf
    included), NaN 0x7F with its sign."""
    sign = (x.to(tl.uint32, bitcast=True) >> 24) & 0x80
    magnitude = tl.minimum(tl.abs(x), FLOAT8_MAX)
    # Normal range: round the float32 mantissa to 3 bits, then re-bias the exponent from 127 to 7.
    bits = magnitude.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal_code = (bits >> 20) - (120 << 3)
    # Subnormal range: the code is magnitude / 2**-9 rounded to nearest even (8 is the smallest normal, 0x08).
    scaled = magnitude * 512.0
    whole = scaled.to(tl.uint32)
    remainder = scaled - whole.to(tl.float32)
    round_up = (remainder > 0.5) | ((remainder == 0.5) & ((whole & 1) == 1))
    subnormal_code = whole + round_up.to(tl.uint32)
    code = tl.where(magnitude < FLOAT8_MIN_NORMAL, subnormal_code, normal_code)
    code = tl.where(x != x, 0x7F, code) | sign
    return code.to(tl.uint8)


@triton.jit
def _scale(normed, weight_ptrs, inside, ONE_PLUS: tl.constexpr, ROUNDING: tl.constexpr):
    """RMSNorm's weight: standard form rounds the normalised value first, one-plus scales in float32."""
    weight = tl.load(weight_ptrs, mask=inside, other=0.0).to(tl.float32)
    if ONE_PLUS:
        out = _round(normed * (1.0 + weight), ROUNDING)
    else:
        out = _round(_round(normed, ROUNDING) * weight, ROUNDING)
    return out


@triton.jit
def add_rms_norm_kernel(
    x_ptr, x_row_stride, residual_ptr, residual_row_stride, weight_ptr,
    out_ptr, new_residual_ptr, N, eps,
    HAS_RESIDUAL: tl.constexpr, ONE_PLUS: tl.constexpr, ROUNDING: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_N)
    inside = columns < N
    x = tl.load(x_ptr + row * x_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + columns, mask=inside, other=0.0)
        x = _round(residual.to(tl.float32) + x, ROUNDING)
        tl.store(new_residual_ptr + row * N + columns, x, mask=inside)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    out = _scale(normed, weight_ptr + columns, inside, ONE_PLUS, ROUNDING)
    tl.store(out_ptr + row * N + columns, out, mask=inside)


@triton.jit
def _load_head(base_ptr, stride_d, halves, inside, norm_ptr, eps,
               HAS_NORM: tl.constexpr, ONE_PLUS: tl.constexpr, ROUNDING: tl.constexpr, HALF: tl.constexpr):
    """One head's two halves in float32, RMSNormed first when the family norms q and k per head (Qwen3, Gemma 3)."""
    x1 = tl.load(base_ptr + halves * stride_d, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(base_ptr + (halves + HALF) * stride_d, mask=inside, other=0.0).to(tl.float32)
    if HAS_NORM:
        inverse_rms = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        x1 = _scale(x1 * inverse_rms, norm_ptr + halves, inside, ONE_PLUS, ROUNDING)
        x2 = _scale(x2 * inverse_rms, norm_ptr + halves + HALF, inside, ONE_PLUS, ROUNDING)
    return x1, x2


@triton.jit
def _rotate(x1, x2, cos, sin, ROUNDING: tl.constexpr):
    """rotate-half RoPE of one head: (x1 cos - x2 sin, x2 cos + x1 sin), each product and sum rounded as torch's."""
    first = _round(_round(x1 * cos, ROUNDING) - _round(x2 * sin, ROUNDING), ROUNDING)
    second = _round(_round(x2 * cos, ROUNDING) + _round(x1 * sin, ROUNDING), ROUNDING)
    return first, second


@triton.jit
def _store_cache(ptr, first, second, halves, inside, stride_d, CACHE_FLOAT8: tl.constexpr, HALF: tl.constexpr):
    if CACHE_FLOAT8:
        first, second = _float8_e4m3fn_bits(first), _float8_e4m3fn_bits(second)
    tl.store(ptr + halves * stride_d, first, mask=inside)
    tl.store(ptr + (halves + HALF) * stride_d, second, mask=inside)


@triton.jit
def rope_store_kv_kernel(
    q_ptr, q_stride_t, q_stride_h, q_stride_d,
    k_ptr, k_stride_t, k_stride_h, k_stride_d,
    v_ptr, v_stride_t, v_stride_h, v_stride_d,
    positions_ptr, inv_freq_ptr, slot_mapping_ptr, q_out_ptr,
    cache_ptr, cache_stride_kv, cache_stride_page, cache_stride_offset, cache_stride_h, cache_stride_d,
    page_size, Hq, q_norm_ptr, k_norm_ptr, norm_eps,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROUNDING: tl.constexpr, CACHE_FLOAT8: tl.constexpr,
    HAS_QK_NORM: tl.constexpr, NORM_ONE_PLUS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    halves = tl.arange(0, BLOCK_HALF)
    inside = halves < HALF
    # Angles in float32 (position * inverse frequency, one rounding, as rope.cos_sin), cos/sin rounded to the
    # model dtype before they multiply.
    angle = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + halves, mask=inside, other=0.0)
    cos = _round(tl.cos(angle), ROUNDING)
    sin = _round(tl.sin(angle), ROUNDING)
    if head < Hq:
        x1, x2 = _load_head(q_ptr + token * q_stride_t + head * q_stride_h, q_stride_d, halves, inside,
                            q_norm_ptr, norm_eps, HAS_QK_NORM, NORM_ONE_PLUS, ROUNDING, HALF)
        first, second = _rotate(x1, x2, cos, sin, ROUNDING)
        out = q_out_ptr + (token * Hq + head) * (2 * HALF)
        tl.store(out + halves, first, mask=inside)
        tl.store(out + halves + HALF, second, mask=inside)
    else:
        kv_head = head - Hq
        slot = tl.load(slot_mapping_ptr + token)
        cache = (cache_ptr + (slot // page_size) * cache_stride_page + (slot % page_size) * cache_stride_offset
                 + kv_head * cache_stride_h)
        x1, x2 = _load_head(k_ptr + token * k_stride_t + kv_head * k_stride_h, k_stride_d, halves, inside,
                            k_norm_ptr, norm_eps, HAS_QK_NORM, NORM_ONE_PLUS, ROUNDING, HALF)
        first, second = _rotate(x1, x2, cos, sin, ROUNDING)
        _store_cache(cache, first, second, halves, inside, cache_stride_d, CACHE_FLOAT8, HALF)
        value = v_ptr + token * v_stride_t + kv_head * v_stride_h
        first = tl.load(value + halves * v_stride_d, mask=inside, other=0.0).to(tl.float32)
        second = tl.load(value + (halves + HALF) * v_stride_d, mask=inside, other=0.0).to(tl.float32)
        _store_cache(cache + cache_stride_kv, first, second, halves, inside, cache_stride_d, CACHE_FLOAT8, HALF)


@triton.jit
def _tanh(x):
    """tanh from exp (no libdevice in the interpreter) as sign(x) (1 - t) / (1 + t), t = exp(-2 |x|) in (0, 1]:
    no overflow, and within a few ulps of torch's tanh."""
    t = tl.exp(-2.0 * tl.abs(x))
    magnitude = tl.div_rn(1.0 - t, 1.0 + t)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def gated_activation_kernel(
    gate_ptr, gate_row_stride, up_ptr, up_row_stride, out_ptr, I,
    GELU_TANH: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < I
    gate = tl.load(gate_ptr + row * gate_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
    if GELU_TANH:
        # torch's formula, cancellation in 1 + tanh for negative gates included, so that both round alike.
        inner = 0.7978845608028654 * (gate + 0.044715 * (gate * gate * gate))
        activated = 0.5 * gate * (1.0 + _tanh(inner))
    else:
        activated = tl.div_rn(gate, 1.0 + tl.exp(-gate))
    out = _round(_round(activated, ROUNDING) * up, ROUNDING)
    tl.store(out_ptr + row * I + columns, out, mask=inside)
