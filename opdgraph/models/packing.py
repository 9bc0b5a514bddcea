"""pack: lay variable-length token sequences end to end for one packed forward (no padding).

Returns the flat input ids, each token's position within its own sequence (RoPE restarts at 0 per sequence), and
the PackedMetadata whose cu_seqlens keep attention inside each sequence.
"""

from __future__ import annotations

import torch

from opdgraph.models.attention_metadata import PackedMetadata


def pack(sequences: list[list[int]], device: torch.device | str = "cpu"
         ) -> tuple[torch.Tensor, torch.Tensor, PackedMetadata]:
    """(input_ids [T] long, positions [T] long, PackedMetadata) for the given non-empty sequences."""
    if not sequences:
        raise ValueError("pack needs at least one sequence")
    lengths = [len(sequence) for sequence in sequences]
    empty = [index for index, length in enumerate(lengths) if length == 0]
    if empty:
        raise ValueError(f"pack: sequences {empty} are empty; every packed sequence needs at least one token")
    input_ids = torch.tensor([token for sequence in sequences for token in sequence], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(length, dtype=torch.long, device=device) for length in lengths])
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, device=device), dim=0)
    return input_ids, positions, PackedMetadata(cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
