"""Batch builder: a scheduled step -> the tensors of one paged forward and of the sampler.

Tokens of all scheduled chunks are packed end to end (no padding) in chunk order; ``PagedMetadata`` describes where
each chunk's K/V goes (slot_mapping) and what it attends to (page_table, kv_lens). The rows whose logits choose a
token (the last row of every chunk that reaches its sequence's end) are listed in ``logit_rows``; a just-prefilled
prompt with n samples contributes one logits row read by n sample rows.

Everything is built on the host as python lists and copied once per step. A flashinfer backend or a CUDA-graph
decode would replace this module (e.g. with persistent device buffers) without touching the scheduler or sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.rollout.sampler import SamplingRows
from opdgraph.rollout.scheduler import ScheduledBatch


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    meta: PagedMetadata
    logit_rows: torch.Tensor  # int64 [R], rows of the forward's hidden states that need logits
    sampling: SamplingRows | None  # None when no chunk samples this step (only partial prefills)


def build_model_inputs(batch: ScheduledBatch, page_size: int, device: torch.device) -> ModelInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_lens: list[int] = []
    kv_lens: list[int] = []
    page_tables: list[list[int]] = []
    logit_rows: list[int] = []
    for chunk in batch.chunks:
        sequence = chunk.sequence
        stop = chunk.start + chunk.num_tokens
        input_ids += sequence.tokens(chunk.start, stop)
        for position in range(chunk.start, stop):
            positions.append(position)
            slot_mapping.append(sequence.pages[position // page_size] * page_size + position % page_size)
        query_lens.append(chunk.num_tokens)
        kv_lens.append(stop)
        page_tables.append(sequence.pages)
        if chunk.samples:
            logit_rows.append(len(input_ids) - 1)

    width = max(len(table) for table in page_tables)
    page_table = [table + [-1] * (width - len(table)) for table in page_tables]

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    recurrent = batch.chunks[0].sequence.state_slot >= 0  # a model with linear-attention layers
    meta = PagedMetadata(
        state_slots=tensor([chunk.sequence.state_slot for chunk in batch.chunks], torch.int64) if recurrent else None,
        query_lens=tensor(query_lens, torch.int32),
        cu_query_lens=tensor([0, *accumulate(query_lens)], torch.int32),
        kv_lens=tensor(kv_lens, torch.int32),
        page_table=tensor(page_table, torch.int32),
        slot_mapping=tensor(slot_mapping, torch.int64),
        page_size=page_size,
    )
    return ModelInputs(
        input_ids=tensor(input_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        meta=meta,
        logit_rows=tensor(logit_rows, torch.int64),
        sampling=_sampling_rows(batch, tensor) if logit_rows else None,
    )


def _sampling_rows(batch: ScheduledBatch, tensor) -> SamplingRows:
    logit_rows, seeds, sample_indices, positions = [], [], [], []
    temperatures, top_k, top_p, min_p, greedy = [], [], [], [], []
    for logit_row, chunk in enumerate(batch.sampling_chunks):
        sequence = chunk.sequence
        params = sequence.request.params
        for sample_index in sequence.sample_indices:
            logit_rows.append(logit_row)
            seeds.append(sequence.request.seed)
            sample_indices.append(sample_index)
            positions.append(len(sequence.generated))
            temperatures.append(1.0 if params.greedy else float(params.temperature))
            top_k.append(params.top_k)
            top_p.append(float(params.top_p))
            min_p.append(float(params.min_p))
            greedy.append(params.greedy)
    sampled = [not g for g in greedy]
    return SamplingRows(
        logit_rows=tensor(logit_rows, torch.int64),
        seeds=tensor(seeds, torch.int64),
        sample_indices=tensor(sample_indices, torch.int64),
        positions=tensor(positions, torch.int64),
        temperatures=tensor(temperatures, torch.float32),
        top_k=tensor(top_k, torch.int64),
        top_p=tensor(top_p, torch.float32),
        min_p=tensor(min_p, torch.float32),
        greedy=tensor(greedy, torch.bool),
        any_greedy=any(greedy),
        all_greedy=all(greedy),
        any_top_k=any(k > 0 for k, s in zip(top_k, sampled) if s),
        any_top_p=any(p < 1.0 for p, s in zip(top_p, sampled) if s),
        any_min_p=any(m > 0.0 for m, s in zip(min_p, sampled) if s),
    )
