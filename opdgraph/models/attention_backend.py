"""Attention backends: the interface the decoder layers call, and the plain-torch reference backend.

A backend computes softmax(q k^T * scale + mask) v for one layer over a packed batch of tokens, where the mask is
causal within each sequence, never crosses sequences, and for sliding layers also hides keys more than
`sliding_window - 1` positions behind the query. Grouped-query attention: query head h reads kv head
h // (num_heads / num_kv_heads).

Two entry points, one per kind of forward (see attention_metadata.py):
- ``packed``: training and teacher scoring, no cache; differentiable.
- ``paged``: rollout prefill/decode; first writes the new tokens' k/v into this layer's paged cache at
  ``meta.slot_mapping``, then attends over each sequence's whole cached context. Runs without autograd. With
  ``kv_written=True`` the caller has already stored this forward's K/V (the fused RoPE + cache-write kernel of
  kernels/fused_decode.py) and passes k = v = None: the backend only attends.

A faster backend (flashinfer) implements the same two methods; it may cache per-forward plans keyed on the metadata
object, since every layer of one forward receives the same metadata.

The reference backend loops over sequences (it syncs cu_seqlens to the host); it favours being obviously correct
and matching the reference numerics (scores in the model dtype, softmax in float32) over speed.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from opdgraph.models.attention_metadata import PackedMetadata, PagedMetadata


class AttentionBackend(Protocol):
    """What a decoder layer needs from attention. q: [T, num_heads, D]; k, v: [T, num_kv_heads, D]; out like q."""

    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PackedMetadata, *,
               scale: float, sliding_window: int | None) -> torch.Tensor: ...

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata,
              kv_cache: torch.Tensor, *, scale: float, sliding_window: int | None,
              kv_written: bool = False) -> torch.Tensor: ...


def attend_one_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_positions: torch.Tensor, *,
                        scale: float, sliding_window: int | None) -> torch.Tensor:
    """Attention of L queries [L, Hq, D] at context positions `query_positions` over keys 0..N-1 [N, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, N, D]
    values = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)) * scale  # [Hq, L, N]
    key_positions = torch.arange(k.shape[0], device=q.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        visible &= key_positions[None, :] > query_positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probabilities, values).transpose(0, 1)  # [L, Hq, D]


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K or V in the KV cache's dtype. A float8_e4m3fn cache saturates at +-448 (infinities included) on every
    device, as the fused rope-and-store kernel does: torch's CPU cast saturates, but its CUDA cast turns values past
    the range into NaN, and one NaN in the cache poisons every later attention over it."""
    if dtype == torch.float8_e4m3fn:
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)  # NaN stays NaN
    return x.to(dtype)


class TorchReferenceBackend:
    """Plain-torch attention for any device; the default backend and the reference faster ones are tested against."""

    def packed(self, q, k, v, meta: PackedMetadata, *, scale, sliding_window):
        bounds = meta.cu_seqlens.tolist()
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            positions = torch.arange(end - start, device=q.device)
            outputs.append(attend_one_sequence(q[start:end], k[start:end], v[start:end], positions,
                                               scale=scale, sliding_window=sliding_window))
        return torch.cat(outputs, dim=0)

    @torch.no_grad()
    def paged(self, q, k, v, meta: PagedMetadata, kv_cache, *, scale, sliding_window, kv_written=False):
        _, _, page_size, num_kv_heads, head_dim = kv_cache.shape
        if not kv_written:
            kv_cache[0].view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = to_cache_dtype(k, kv_cache.dtype)
            kv_cache[1].view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = to_cache_dtype(v, kv_cache.dtype)

        outputs = []
        query_bounds = meta.cu_query_lens.tolist()
        for seq, context_len in enumerate(meta.kv_lens.tolist()):
            start, end = query_bounds[seq], query_bounds[seq + 1]
            num_pages = -(-context_len // page_size)
            pages = meta.page_table[seq, :num_pages].long()
            keys = kv_cache[0, pages].reshape(-1, num_kv_heads, head_dim)[:context_len].to(q.dtype)
            values = kv_cache[1, pages].reshape(-1, num_kv_heads, head_dim)[:context_len].to(q.dtype)
            positions = torch.arange(context_len - (end - start), context_len, device=q.device)
            outputs.append(attend_one_sequence(q[start:end], keys, values, positions,
                                               scale=scale, sliding_window=sliding_window))
        return torch.cat(outputs, dim=0)


@contextlib.contextmanager
def using_backend(model, backend: AttentionBackend):
    """Give `model` this attention backend for the block (rollout paths); its own backend comes back afterwards."""
    previous = model.backend
    model.set_attention_backend(backend)
    try:
        yield model
    finally:
        model.set_attention_backend(previous)
