"""Paged decode attention in Triton, driven entirely by device tensors (no host-side plan), for decode bursts.

A decode step feeds one query token per sequence. flashinfer needs a host-side ``plan()`` per step (page lists,
split schedule), which pins the host to every step. This kernel instead reads each sequence's context length
(``meta.kv_lens``) and page table (``meta.page_table``) from the device, so many decode steps can run back to back
inside one CUDA graph replay loop while the host does nothing (``opdgraph.rollout.decode_burst``).

Split-KV ("flash decoding"): the grid is (sequences, kv head blocks, splits). Each program takes the query heads
that share its kv heads (grouped-query attention: one [heads, HPP x D] x [HPP x D, tokens] dot per tile of keys,
HPP kv heads per program, 1 by default), walks 1/splits of that sequence's visible context, and writes an fp32
partial output and its log-sum-exp; a second kernel merges the splits (or, with ``merge_in_kernel``, the split
program that arrives last). The number of splits is fixed per batch size (a CUDA graph fixes the grid) and each
sequence divides its own length evenly between them, so short and long sequences both fill the splits.

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
from dataclasses import dataclass

import torch

from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.models.attention_metadata import PagedMetadata


@dataclass(frozen=True)
class LaunchSettings:
    """How the kernel is launched; one CUDA graph fixes them per captured batch size.

    ``programs_per_sm``: splits are chosen so that about this many programs per SM are in flight (unless
    ``num_splits`` fixes them). Measured end to end on an H100 (Qwen2.5-1.5B decode,
    benchmarks/results/rollout_attention_settings_h100.txt): 2 gave 3.74 ms/step at batch 128 against 3.82 with 4.
    ``kv_heads_per_program``: 1, or 0 for as many of a sequence's kv heads as fit one [tokens, <= 256] tile (a
    power of two dividing Hkv); a program then reads whole contiguous token rows of the cache (see the Triton file).
    ``head_major``: grid axis 0 walks the head blocks, so one sequence's programs are launched together.
    ``merge_in_kernel``: with several splits, the last split program of each (sequence, head block) merges them
    (an arrival counter per pair) instead of a second kernel launch.
    """

    block_n: int = 32  # keys per tile
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2
    num_splits: int = 0  # 0: from programs_per_sm
    kv_heads_per_program: int = 1
    head_major: bool = False
    merge_in_kernel: bool = False


DEFAULT_SETTINGS = LaunchSettings()
# Per captured batch size overrides (benchmarks/decode_variants.py measures them); read at call time.
SETTINGS_BY_BATCH: dict[int, LaunchSettings] = {}
MAX_SPLITS = 64  # a power of two (the in-kernel merge's tile of splits)
MAX_PROGRAM_COLUMNS = 256  # kv heads x head_dim of one program's tile (registers: the [heads, columns] accumulator)


def settings_for(batch_size: int) -> LaunchSettings:
    return SETTINGS_BY_BATCH.get(batch_size, DEFAULT_SETTINGS)


def kv_heads_per_program(setting: int, num_kv_heads: int, head_dim: int) -> int:
    """The kv heads one program takes: ``setting`` (0: the most that fit), a power of two dividing Hkv."""
    wanted = setting or max(1, MAX_PROGRAM_COLUMNS // head_dim)
    heads = 1
    while heads * 2 <= min(wanted, num_kv_heads) and num_kv_heads % (heads * 2) == 0:
        heads *= 2
    return heads


def num_splits_for(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device,
                   settings: LaunchSettings = DEFAULT_SETTINGS, head_dim: int = 128) -> int:
    """Splits per (sequence, head block): enough programs to fill the GPU, never more than tiles of the longest
    context."""
    tiles = -(-max_context // settings.block_n)
    if settings.num_splits:
        return max(1, min(settings.num_splits, tiles, MAX_SPLITS))
    blocks = num_kv_heads // kv_heads_per_program(settings.kv_heads_per_program, num_kv_heads, head_dim)
    programs = num_seqs * blocks
    wanted = -(-settings.programs_per_sm * _num_sms(device) // max(programs, 1))
    return max(1, min(wanted, tiles, MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, kv_lens: torch.Tensor, page_table: torch.Tensor,
                           *, scale: float, sliding_window: int | None, num_splits: int,
                           settings: LaunchSettings = DEFAULT_SETTINGS,
                           arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """q [S, Hq, D] (one query per sequence, at position kv_lens[s] - 1) over the paged cache
    [2, pages, page_size, Hkv, D] -> [S, Hq, D] in q's dtype. kv_lens int32 [S] (>= 1), page_table int32 [S, W].
    ``settings``' num_splits is ignored here (the caller resolved it into ``num_splits``). ``arrivals``: int32
    counters, at least S x head blocks of them, all 0 (the kernel leaves them 0), for ``merge_in_kernel``; None
    allocates zeroed ones per call."""
    from opdgraph.kernels import paged_decode_attention_triton as body

    num_seqs, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    heads_per_program = kv_heads_per_program(settings.kv_heads_per_program, num_kv_heads, head_dim)
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
    head_blocks = num_kv_heads // heads_per_program
    merge_in_kernel = settings.merge_in_kernel and num_splits > 1
    if merge_in_kernel and arrivals is None:
        arrivals = torch.zeros(num_seqs * head_blocks, dtype=torch.int32, device=q.device)
    grid = (head_blocks, num_seqs, num_splits) if settings.head_major else (num_seqs, head_blocks, num_splits)
    body.split_kernel[grid](
        q, keys, values, page_table, kv_lens, partial_out, partial_lse, out, out if arrivals is None else arrivals,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), page_table.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2), partial_lse.stride(0), out.stride(0),
        out.stride(1), scale, 0 if sliding_window is None else sliding_window, num_splits, head_blocks,
        PAGE_SIZE=page_size, GROUP=group, HPP=heads_per_program,
        BLOCK_H=max(16, 1 << (group * heads_per_program - 1).bit_length()), HEAD_DIM=head_dim,
        BLOCK_N=settings.block_n, SINGLE_SPLIT=num_splits == 1, HEAD_MAJOR=settings.head_major,
        # One BLOCK_S for every split count (a [heads, 64] float32 tile is cheap): one compile, not one per count.
        MERGE_IN_KERNEL=merge_in_kernel, BLOCK_S=MAX_SPLITS if merge_in_kernel else 2,
        IEEE=q.dtype == torch.float32, num_warps=settings.num_warps, num_stages=settings.num_stages,
    )
    if num_splits == 1 or merge_in_kernel:
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

    Launch settings and splits are fixed per batch size (``settings_for``; callers capture CUDA graphs per size),
    read at each call so that a benchmark can change them between captures. Every paged forward
    given to this backend must feed exactly one token per sequence (the burst driver guarantees it; nothing checks it
    on the device). K/V of the new tokens are written first unless the caller already wrote them
    (``kv_written=True``, the fused RoPE + KV-store kernel does).
    """

    def __init__(self, *, num_kv_heads: int, max_context: int, device: torch.device):
        self.num_kv_heads = num_kv_heads
        self.max_context = max_context
        self.device = torch.device(device)
        self._reference = TorchReferenceBackend()
        # merge_in_kernel's counters, shared by every layer (their kernels run one after the other and leave them
        # 0). Grown, never shrunk: DecodeBurst runs every step eagerly before it captures one, so the growth for a
        # new batch size happens outside a capture.
        self._arrivals = torch.zeros(0, dtype=torch.int32, device=self.device)

    def launch(self, batch_size: int, head_dim: int) -> tuple[LaunchSettings, int]:
        """(settings, splits) of a batch size."""
        settings = settings_for(batch_size)
        return settings, num_splits_for(batch_size, self.num_kv_heads, self.max_context, self.device, settings,
                                        head_dim)

    def packed(self, q, k, v, meta, *, scale, sliding_window):
        return self._reference.packed(q, k, v, meta, scale=scale, sliding_window=sliding_window)

    @torch.no_grad()
    def paged(self, q, k, v, meta: PagedMetadata, kv_cache, *, scale, sliding_window, kv_written: bool = False):
        from opdgraph.kernels.flashinfer_attention import write_kv

        if not kv_written:
            write_kv(kv_cache, k, v, meta.slot_mapping)
        settings, num_splits = self.launch(q.shape[0], q.shape[-1])
        if settings.merge_in_kernel and self._arrivals.numel() < q.shape[0] * self.num_kv_heads:
            self._arrivals = torch.zeros(q.shape[0] * self.num_kv_heads, dtype=torch.int32, device=self.device)
        return paged_decode_attention(q, kv_cache, meta.kv_lens, meta.page_table, scale=scale,
                                      sliding_window=sliding_window, num_splits=num_splits, settings=settings,
                                      arrivals=self._arrivals)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
