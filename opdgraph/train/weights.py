"""Per-position loss weights: which positions are trained and how the loss is normalised.

The loss (``divergence.py``) is sum_i w_i D_i over the packed positions of a micro-batch. This module builds w from
the packed layout (``cu_seqlens``, as in ``opdgraph.models.attention_metadata.PackedMetadata``) and a loss mask
(True where position i predicts a response token):
- ``token``:    w_i = 1 / num_response_tokens_global       (every trained token counts the same)
- ``sequence``: w_i = 1 / (num_seqs_global * len_seq(i))    (every sequence counts the same; len_seq(i) is the
  number of trained positions of the sequence holding i)
and w_i = 0 where the mask is False. The global counts span every micro-batch and data-parallel rank of the
optimizer step, so they come from the caller (sum ``local_counts`` over ranks and micro-batches); without them the
local counts are used. Only sequences with at least one trained position count towards num_seqs.
"""

from __future__ import annotations

import torch

NORMALIZATIONS = ("token", "sequence")


def _response_lengths(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index of every position [N], trained positions per sequence [S])."""
    seq_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if loss_mask.shape != (int(cu_seqlens[-1]),):
        raise ValueError(f"loss_mask has shape {list(loss_mask.shape)} but cu_seqlens covers {int(cu_seqlens[-1])}")
    sequence_of_position = torch.repeat_interleave(torch.arange(len(seq_lengths), device=loss_mask.device), seq_lengths)
    response_lengths = torch.zeros(len(seq_lengths), dtype=torch.long, device=loss_mask.device)
    response_lengths.index_add_(0, sequence_of_position, loss_mask.long())
    return sequence_of_position, response_lengths


def local_counts(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[int, int]:
    """(trained tokens, sequences with at least one trained token) of this micro-batch, to be summed globally."""
    _, response_lengths = _response_lengths(loss_mask, cu_seqlens)
    return int(response_lengths.sum()), int((response_lengths > 0).sum())


def position_weights(
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    normalize: str,
    global_token_count: int | None = None,
    global_seq_count: int | None = None,
) -> torch.Tensor:
    """fp32 [N] weights w_i for the packed positions (see module docstring)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    sequence_of_position, response_lengths = _response_lengths(loss_mask, cu_seqlens)
    mask = loss_mask.to(torch.float32)
    if normalize == "token":
        local = int(response_lengths.sum())
        total = _global_or_local(global_token_count, local, "global_token_count")
        return mask / max(total, 1)
    local = int((response_lengths > 0).sum())
    num_seqs = _global_or_local(global_seq_count, local, "global_seq_count")
    # clamp: positions of sequences with no trained token are masked anyway, this only avoids 0/0.
    per_position_length = response_lengths.clamp(min=1)[sequence_of_position].to(torch.float32)
    return mask / (per_position_length * max(num_seqs, 1))


def _global_or_local(global_count: int | None, local_count: int, name: str) -> int:
    if global_count is None:
        return local_count
    if global_count < local_count:
        raise ValueError(
            f"{name}={global_count} is smaller than this micro-batch's own count {local_count}; pass the sum of "
            "local_counts() over all micro-batches and ranks of the optimizer step"
        )
    return global_count
