"""The rollout state of one linear-attention layer: a conv window and a delta-rule state per sequence slot.

Where an attention layer keeps K/V pages that grow with the context, a gated-DeltaNet layer keeps, per sequence, a
fixed-size state: the last kernel - 1 inputs of its causal conv (model dtype) and the delta rule's per-head state
(float32, as the reference keeps it). The engine gives each running sequence a slot (PagedMetadata.state_slots); a
forward whose chunk starts a sequence (no cached tokens) starts from zeros, so a slot never needs clearing, and the n
samples of a prompt each continue from a copy of the prompt's slot (``copy_slot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearLayerState:
    conv: torch.Tensor  # [slots, kernel - 1, conv channels], model dtype
    recurrent: torch.Tensor  # [slots, value heads, key dim, value dim], float32

    @classmethod
    def allocate(cls, num_slots: int, dims, dtype: torch.dtype, device) -> "LinearLayerState":
        return cls(conv=torch.zeros(num_slots, dims.kernel - 1, dims.conv_channels, dtype=dtype, device=device),
                   recurrent=torch.zeros(num_slots, dims.value_heads, dims.key_dim, dims.value_dim,
                                         dtype=torch.float32, device=device))

    def copy_slot(self, source: int, destination: int) -> None:
        self.conv[destination] = self.conv[source]
        self.recurrent[destination] = self.recurrent[source]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes
