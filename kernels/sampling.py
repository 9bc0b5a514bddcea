"""Fused sampler for rows without top-k / top-p / min-p: one pass over each row's logits (Triton).

The rollout sampler (``opdgraph.rollout.sampler``) sends CUDA logits here when no row filters: temperature
sampling (the counter-based exponential race) and greedy rows, mixed freely. Per sample row the kernel reads the
logits once and returns the chosen token and its raw log-prob ``log_softmax(logits)[token]``, the same contract as
the torch sampler (which stays the CPU path, the filtered path and the reference the tests compare with).

Each row's vocabulary is split over several programs so that a small batch still fills the GPU; a second tiny
kernel merges the splits. Triton is imported lazily (the package imports without it).
"""

from __future__ import annotations

import functools

import torch

BLOCK_V = 2048
PROGRAMS_PER_SM = 4  # enough programs in flight to cover memory latency


def sample_unfiltered(logits: torch.Tensor, rows, *, block_v: int = BLOCK_V,
                      num_programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (float32 or bf16), ``SamplingRows`` with no filters -> (tokens int64 [K], logprobs f32 [K]).

    ``num_programs`` (default: a few per SM) sets how finely rows are split; tests pass small values."""
    from opdgraph.kernels import sampling_triton as body

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    num_rows = rows.logit_rows.shape[0]
    vocab_size = logits.shape[-1]
    num_blocks = -(-vocab_size // block_v)
    target = num_programs if num_programs is not None else PROGRAMS_PER_SM * _num_sms(logits.device)
    splits_wanted = max(1, min(num_blocks, -(-target // max(num_rows, 1))))
    split_size = -(-num_blocks // splits_wanted) * block_v
    num_splits = -(-vocab_size // split_size)
    device = logits.device
    best_score = torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)
    best_index = torch.empty(num_rows, num_splits, dtype=torch.int32, device=device)
    partial_max = torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)
    partial_sum = torch.empty(num_rows, num_splits, dtype=torch.float32, device=device)
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return tokens, logprobs
    body.race_partials_kernel[(num_rows, num_splits)](
        logits, logits.stride(0), rows.logit_rows,
        rows.seeds, rows.sample_indices, rows.positions, rows.temperatures, rows.greedy,
        best_score, best_index, partial_max, partial_sum,
        vocab_size, split_size, num_splits,
        ALL_GREEDY=rows.all_greedy, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    body.race_combine_kernel[(num_rows,)](
        logits, logits.stride(0), rows.logit_rows,
        best_score, best_index, partial_max, partial_sum,
        tokens, logprobs, num_splits,
        BLOCK_S=max(2, 1 << (num_splits - 1).bit_length()),
    )
    return tokens, logprobs


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
