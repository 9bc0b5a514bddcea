"""Rollout samples -> packed training micro-batches with the positions the loss trains on.

A sample is prompt + response, laid end to end with the other samples of its micro-batch (no padding). The loss
trains every position whose *next* token is a response token: for a sample with P prompt and R response tokens at
packed offset o, that is positions o+P-1 ... o+P+R-2, and the targets are the R response tokens (the EOS token
included when it was sampled). Prompt positions are never trained.

Micro-batches are filled greedily in sample order up to `micro_batch_tokens`; a sample never straddles two
micro-batches (attention needs the whole sequence), so one longer than the budget is an error naming the setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opdgraph.models.attention_metadata import PackedMetadata
from opdgraph.train.weights import position_weights


@dataclass
class Sample:
    """One sampled response to one prompt, with everything later stages need."""

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_index: int  # index of the prompt within this step's global batch
    sample_index: int
    finish_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    answer: str | None = None


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]
    meta: PackedMetadata
    loss_positions: torch.Tensor  # long [N], indices into the packed tokens
    target_ids: torch.Tensor  # long [N], the response token each loss position predicts
    weights: torch.Tensor  # fp32 [N], normalisation (token or sequence mean over the global batch)
    sample_of_position: torch.Tensor  # long [N], which sample of this micro-batch each loss position belongs to
    samples: list[Sample]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _pack(samples: list[Sample], *, normalize: str, global_tokens: int, global_sequences: int,
          device: torch.device) -> MicroBatch:
    ids, positions, cu, loss_pos, targets, owner = [], [], [0], [], [], []
    for index, sample in enumerate(samples):
        offset = cu[-1]
        sequence = sample.prompt_ids + sample.response_ids
        ids.extend(sequence)
        positions.extend(range(len(sequence)))
        cu.append(offset + len(sequence))
        first = offset + len(sample.prompt_ids) - 1
        count = len(sample.response_ids)
        loss_pos.extend(range(first, first + count))
        targets.extend(sample.response_ids)
        owner.extend([index] * count)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    long = dict(dtype=torch.long, device=device)
    loss_positions = torch.tensor(loss_pos, **long)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    loss_mask = torch.zeros(cu[-1], dtype=torch.bool, device=device).index_fill_(0, loss_positions, True)
    weights = position_weights(loss_mask, cu_seqlens, normalize=normalize, global_token_count=global_tokens,
                               global_seq_count=global_sequences).index_select(0, loss_positions)
    return MicroBatch(
        input_ids=torch.tensor(ids, **long),
        positions=torch.tensor(positions, **long),
        meta=PackedMetadata(cu_seqlens=cu_seqlens, max_seqlen=max(lengths)),
        loss_positions=loss_positions,
        target_ids=torch.tensor(targets, **long),
        weights=weights,
        sample_of_position=torch.tensor(owner, **long),
        samples=samples,
    )


def build_micro_batches(samples: list[Sample], *, micro_batch_tokens: int, normalize: str, global_tokens: int,
                        global_sequences: int, device: torch.device) -> list[MicroBatch]:
    """Pack samples greedily into micro-batches of at most `micro_batch_tokens` tokens."""
    groups: list[list[Sample]] = []
    current: list[Sample] = []
    current_tokens = 0
    for sample in samples:
        length = len(sample.prompt_ids) + len(sample.response_ids)
        if length > micro_batch_tokens:
            raise ValueError(
                f"a sample of {length} tokens (prompt {len(sample.prompt_ids)} + response "
                f"{len(sample.response_ids)}) exceeds teacher_score.micro_batch_tokens = {micro_batch_tokens}; "
                "raise micro_batch_tokens to at least data.max_prompt_tokens + rollout.max_new_tokens"
            )
        if current and current_tokens + length > micro_batch_tokens:
            groups.append(current)
            current, current_tokens = [], 0
        current.append(sample)
        current_tokens += length
    if current:
        groups.append(current)
    return [_pack(group, normalize=normalize, global_tokens=global_tokens, global_sequences=global_sequences,
                  device=device) for group in groups]
