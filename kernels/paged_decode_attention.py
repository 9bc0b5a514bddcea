"""Paged decode attention in Triton, driven entirely by device tensors (no host-side plan), for decode bursts.

A decode step feeds one query token per sequence. flashinfer needs a host-side ``plan()`` per step (page lists,
split schedule), which pins the host to every step. This kernel instead reads each sequence's context length
(``meta.kv_lens``) and page table (``meta.page_table``) from the device, so many decode steps can run back to back
inside one CUDA graph replay loop while the host does nothing (``opdgraph.rollout.decode_burst``).

Split-KV ("flash decoding"): the grid is (sequences, kv heads, splits). Each program takes the query heads that
share one kv head (grouped-query attention: one [heads, D] x [D, tokens] dot per tile of keys), walks 1/splits of
that sequence's visible context, and writes an fp32 partial output and its log-sum-exp; a second kernel merges the
splits. The number of splits is fixed per batch size (a CUDA graph fixes the grid) and each sequence divides its own
length evenly between them, so short and long sequences both fill the splits.

Numerics: q.k and p.v products on tensor cores with fp32 accumulation, softmax statistics in fp32, probabilities
rounded to the query dtype before the p.v product (the usual flash-attention choice; the plain-torch reference
rounds scores to the model dtype instead, so results agree to bf16 tolerance, not bit for bit). float32 models use
IEEE fp32 dots (no TF32). An fp8 (e4m3) cache is read and widened to the query dtype (scale 1, like flashinfer's
path here).

Triton is imported lazily; ``TritonDecodeBackend`` is an attention backend (see
``opdgraph.models.attention_backend``) whose ``paged`` handles decode-only forwards; prefill forwards go to the
backend given as ``prefill``.
"""

from __future__ import annotations

import functools

import torch

from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.models.attention_metadata import PagedMetadata

BLOCK_N = 32  # keys per tile
NUM_WARPS = 4
NUM_STAGES = 2
# Split until about this many programs per SM are in flight. Measured end to end on an H100 (Qwen2.5-1.5B decode,
# benchmarks/results/rollout_attention_settings_h100.txt): 2 gives 3.74 ms/step at batch 128 against 3.82 with 4,
# and the same 2.4-2.5 ms at batch 32.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64


def num_splits_for(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs to fill the GPU, never more than tiles of the longest context."""
    programs = num_seqs * num_kv_heads
    wanted = -(-PROGRAMS_PER_SM * _num_sms(device) // max(programs, 1))
    return max(1, min(wanted, -(-max_context // BLOCK_N), MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, kv_lens: torch.Tensor, page_table: torch.Tensor,
                           *, scale: float, sliding_window: int | None, num_splits: int, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q [S, Hq, D] (one query per sequence, at position kv_lens[s] - 1) over the paged cache
    [2, pages, page_size, Hkv, D] -> [S, Hq, D] in q's dtype. kv_lens int32 [S] (>= 1), page_table int32 [S, W].
    The launch settings are for benchmarks/decode_attention_bench.py; unset, the module's BLOCK_N / NUM_WARPS /
    NUM_STAGES apply (what the engine uses; read at call time so a benchmark can try others)."""
    block_n, num_warps = block_n or BLOCK_N, num_warps or NUM_WARPS
    num_stages = num_stages or NUM_STAGES
    from opdgraph.kernels import paged_decode_attention_triton as body

    num_seqs, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    if q.stride(-1) != 1:
        q = q.contiguous()
    keys, values = kv_cache[0], kv_cache[1]
    # One split writes the output directly; the partial buffers are then unused placeholders.
    partial_splits = num_splits if num_splits > 1 else 0
    partial_out = torch.empty(num_seqs, num_heads, partial_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(num_seqs, num_heads, partial_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    body.split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, keys, values, page_table, kv_lens, partial_out, partial_lse, out,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), page_table.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_lse.stride(0), out.stride(0),
        out.stride(1), scale, 0 if sliding_window is None else sliding_window,
        PAGE_SIZE=page_size, GROUP=group, BLOCK_H=max(16, 1 << (group - 1).bit_length()), HEAD_DIM=head_dim,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, IEEE=q.dtype == torch.float32, num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits == 1:
        return out
    body.merge_kernel[(num_seqs, num_heads)](
        partial_out, partial_lse, out,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_lse.stride(0), out.stride(0),
        out.stride(1),
        NUM_SPLITS=num_splits, BLOCK_S=max(2, 1 << (num_splits - 1).bit_length()), HEAD_DIM=head_dim,
    )
    return out


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The kernel needs a power-of-two head_dim of at least 16 (Triton dot shapes) and whole query groups."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and num_heads % num_kv_heads == 0


class TritonDecodeBackend:
    """Attention backend for decode bursts: decode-only paged forwards through the Triton kernel.

    ``num_splits(batch_size)`` is fixed per batch size (callers capture CUDA graphs per size). Every paged forward
    given to this backend must feed exactly one token per sequence (the burst driver guarantees it; nothing checks it
    on the device). K/V of the new tokens are written first unless the caller already wrote them
    (``kv_written=True``, the fused RoPE + KV-store kernel does).
    """

    def __init__(self, *, num_kv_heads: int, max_context: int, device: torch.device):
        self.num_kv_heads = num_kv_heads
        self.max_context = max_context
        self.device = torch.device(device)
        self._reference = TorchReferenceBackend()

    def num_splits(self, batch_size: int) -> int:
        return num_splits_for(batch_size, self.num_kv_heads, self.max_context, self.device)

    def packed(self, q, k, v, meta, *, scale, sliding_window):
        return self._reference.packed(q, k, v, meta, scale=scale, sliding_window=sliding_window)

    @torch.no_grad()
    def paged(self, q, k, v, meta: PagedMetadata, kv_cache, *, scale, sliding_window, kv_written: bool = False):
        from opdgraph.kernels.flashinfer_attention import write_kv

        if not kv_written:
            write_kv(kv_cache, k, v, meta.slot_mapping)
        return paged_decode_attention(q, kv_cache, meta.kv_lens, meta.page_table, scale=scale,
                                      sliding_window=sliding_window, num_splits=self.num_splits(q.shape[0]))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
