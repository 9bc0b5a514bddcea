"""Attention metadata: the contract between the model's attention layers and whoever schedules a forward.

Every forward of the decoder runs over a *packed* batch of tokens (no padding): T tokens from S sequences laid end to
end. Three uses share this one description:

- training / teacher scoring: ``PackedMetadata`` (cu_seqlens over the packed tokens, no cache);
- rollout prefill and decode: ``PagedMetadata`` (each sequence appends its new tokens to a paged KV cache and attends
  to everything cached for it so far).

KV-cache layout (owned by the rollout engine, read and written by the attention backend):
    per layer one tensor ``kv[layer]`` of shape [2, num_pages, page_size, num_kv_heads, head_dim]
    (index 0 = keys, 1 = values). A token's slot is ``page * page_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedMetadata:
    """T packed tokens of S sequences; attention is causal within a sequence and never crosses sequences."""

    cu_seqlens: torch.Tensor  # int32 [S + 1], cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int


@dataclass
class PagedMetadata:
    """One paged forward: sequence s contributes query_lens[s] new tokens at the end of its context.

    Tokens of sequence s are packed contiguously in the input, in sequence order. After the forward, sequence s has
    kv_lens[s] tokens cached (its earlier context plus the new ones); the new tokens sit at positions
    kv_lens[s] - query_lens[s] ... kv_lens[s] - 1 and attend causally to the whole cached context.
    """

    query_lens: torch.Tensor  # int32 [S]
    cu_query_lens: torch.Tensor  # int32 [S + 1]
    kv_lens: torch.Tensor  # int32 [S], context length after appending this forward's tokens
    page_table: torch.Tensor  # int32 [S, max_pages_per_seq], -1 (or anything) past a sequence's last page
    slot_mapping: torch.Tensor  # int64 [T], cache slot where each new token's K/V is written
    page_size: int
    # Models with linear-attention layers: int64 [S], the recurrent-state slot of each sequence (linear_state.py);
    # a sequence whose chunk starts at position 0 starts from a zero state whatever its slot holds.
    state_slots: torch.Tensor | None = None
