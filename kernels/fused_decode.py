"""Fused elementwise kernels for the rollout forward (prefill chunks and decode steps) of the decoder.

The plain-torch decoder layer spends a dozen small kernels on what is one pass over memory: RMSNorm in pieces
(pow, mean, rsqrt, mul, casts), the residual add, RoPE (cat, neg, mul, add), the K/V cache write (two index copies)
and the gated activation (act, mul). ``DecoderLM.forward_paged`` calls these wrappers instead when
``model.use_fused_decode_kernels`` is on (the GPU rollout sets it); training never does.

- ``rms_norm(x, weight, eps, one_plus)`` and ``fused_add_rms_norm(x, residual, weight, eps, one_plus)``:
  ``RMSNorm.forward`` of layers.py, the second after ``residual + x`` (which it also returns).
- ``rope_and_store_kv(q, k, v, positions, inv_freq, kv_cache, slot_mapping, *, q_norm_weight=None, ...)``: RoPE
  on q and k (rope.py), after the per-head q/k RMSNorm when given; rotated k and v stored at their cache slots;
  returns rotated q. The attention backend is then told the cache is already written
  (``backend.paged(q, None, None, meta, kv_cache, ..., kv_written=True)``).
- ``gated_activation(gate, up, activation)``: ``act(gate) * up`` of ``GatedMLP``.

Numerics match the plain path: float32 math, rounded to the model dtype after each op where torch rounds. Exact
except where the two sides compute a float32 function differently (RMSNorm's sum order and rsqrt; cos/sin/exp;
interpreter numpy vs torch's CPU kernels; GELU's tanh from exp), which moves float32 results by an ulp or so and,
rarely, a bfloat16 result by one ulp (the tiny models' bfloat16 forwards are bit-identical in the interpreter).
Float8 caches store a saturating cast (nearest even, +-448 for anything larger, inf included), like the plain
cache writes (opdgraph.models.attention_backend.to_cache_dtype); torch's own cast makes NaN past 448 on some
devices and versions.
Kernel bodies live in fused_decode_triton.py.

Every wrapper launches without host syncs (CUDA-graph capturable): ``positions``, ``inv_freq``, ``slot_mapping``
must already be on the device. Inputs may be strided views (rows, heads); outputs are new contiguous tensors.
Triton is imported lazily, inside the wrappers.
"""

from __future__ import annotations

import torch

ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATIONS = ("silu", "gelu_tanh")
ACTIVATION_BLOCK = 1024


def _body():
    from opdgraph.kernels import fused_decode_triton

    return fused_decode_triton


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., N] as [R, N] rows with unit column stride (a view when the leading dims allow it)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_launch(x, residual, weight, eps, one_plus):
    rows = _rows(x)
    num_rows, width = rows.shape
    out = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else out
    residual_rows = _rows(residual) if residual is not None else rows
    if num_rows:
        block = _next_power_of_2(width)
        _body().add_rms_norm_kernel[(num_rows,)](
            rows, rows.stride(0), residual_rows, residual_rows.stride(0), weight,
            out, new_residual, width, eps,
            HAS_RESIDUAL=residual is not None, ONE_PLUS=one_plus, ROUNDING=ROUNDING[x.dtype], BLOCK_N=block,
            num_warps=min(max(block // 512, 1), 16),
        )
    return out.view(x.shape), new_residual.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, one_plus: bool) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N] (N <= 8192 or so: one program holds a row); weight [N]."""
    return _norm_launch(x, None, weight, eps, one_plus)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       one_plus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x); the sum rounded to the input dtype as torch's add rounds it."""
    return _norm_launch(x, residual, weight, eps, one_plus)


def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      inv_freq: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                      q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                      norm_eps: float = 0.0, norm_one_plus: bool = False) -> torch.Tensor:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by positions [T] (int) with float32 inv_freq [D / 2]; store rotated k
    and v [T, Hkv, D] at slot_mapping [T] (page * page_size + offset) of kv_cache [2, pages, page_size, Hkv, D]
    (model dtype or float8_e4m3fn). Returns rotated q, contiguous [T, Hq, D] in q's dtype.

    With q_norm_weight and k_norm_weight [D] (Qwen3, Gemma 3) each head is first RMSNormed, as
    ``rms_norm(q, q_norm_weight, norm_eps, norm_one_plus)`` would, inside the same kernel."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if kv_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"KV cache dtype must be the model dtype ({q.dtype}) or torch.float8_e4m3fn, "
                         f"got {kv_cache.dtype}")
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    cache_float8 = kv_cache.dtype == torch.float8_e4m3fn
    cache = kv_cache.view(torch.uint8) if cache_float8 else kv_cache
    half = head_dim // 2
    _body().rope_store_kv_kernel[(num_tokens, num_heads + num_kv_heads)](
        q, *q.stride(), k, *k.stride(), v, *v.stride(),
        positions, inv_freq, slot_mapping, q_out,
        cache, cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), cache.stride(4),
        kv_cache.shape[2], num_heads,
        q if q_norm_weight is None else q_norm_weight, k if k_norm_weight is None else k_norm_weight, norm_eps,
        HALF=half, BLOCK_HALF=_next_power_of_2(half), ROUNDING=ROUNDING[q.dtype], CACHE_FLOAT8=cache_float8,
        HAS_QK_NORM=q_norm_weight is not None, NORM_ONE_PLUS=norm_one_plus, num_warps=1,
    )
    return q_out


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up for gate, up [T, I]; activation "silu" or "gelu_tanh" (tanh-approximated GELU)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    gate_rows, up_rows = _rows(gate), _rows(up)
    num_rows, width = gate_rows.shape
    out = torch.empty(num_rows, width, dtype=gate.dtype, device=gate.device)
    if num_rows:
        block = min(ACTIVATION_BLOCK, _next_power_of_2(width))
        _body().gated_activation_kernel[(num_rows, -(-width // block))](
            gate_rows, gate_rows.stride(0), up_rows, up_rows.stride(0), out, width,
            GELU_TANH=activation == "gelu_tanh", ROUNDING=ROUNDING[gate.dtype], BLOCK=block, num_warps=4,
        )
    return out.view(gate.shape)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
