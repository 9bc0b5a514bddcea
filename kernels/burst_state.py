"""The per-step bookkeeping of a decode burst (opdgraph.rollout.decode_burst) in two kernel launches instead of
about twenty tiny torch ops (gather, div, mod, where, casts, index copies, adds), each a separate launch in the
captured step that costs the GPU a few microseconds for a few hundred bytes of work.

- ``decode_slots(positions, steps_left, page_table, page_size, scratch_slot)`` -> (slots int64 [R],
  kv_lens int32 [R]): the slot of each row's fed token, ``page_table[r, pos // page_size] * page_size +
  pos % page_size``, or ``scratch_slot`` for a row with no steps left; kv_lens = pos + 1.
- ``advance(tokens, logprobs, out_tokens, out_logprobs, step, input_ids, positions, sample_positions,
  steps_left)``: ``out_*[step] = tokens / logprobs``; rows with steps left feed their token next, and their
  positions and sample positions move on by one while their steps left go down by one; then ``step += 1``.

Integer work only (log-probs are copied), so the results equal the torch ops they replace exactly; DecodeBurst
keeps those ops as the CPU path and the tests compare both. Launches without host syncs (CUDA-graph capturable).
Triton is imported lazily.
"""

from __future__ import annotations

import torch

BLOCK = 256


def _body():
    from opdgraph.kernels import burst_state_triton

    return burst_state_triton


def decode_slots(positions: torch.Tensor, steps_left: torch.Tensor, page_table: torch.Tensor, page_size: int,
                 scratch_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = positions.shape[0]
    slots = torch.empty(rows, dtype=torch.int64, device=positions.device)
    kv_lens = torch.empty(rows, dtype=torch.int32, device=positions.device)
    if rows:
        _body().slots_kernel[(-(-rows // BLOCK),)](positions, steps_left, page_table, page_table.stride(0), slots,
                                                   kv_lens, rows, page_size, scratch_slot, BLOCK=BLOCK)
    return slots, kv_lens


def advance(tokens: torch.Tensor, logprobs: torch.Tensor, out_tokens: torch.Tensor, out_logprobs: torch.Tensor,
            step: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, sample_positions: torch.Tensor,
            steps_left: torch.Tensor) -> None:
    """In place; out_tokens / out_logprobs [steps, R] views with unit column stride and equal row strides."""
    rows = tokens.shape[0]
    _body().advance_kernel[(1,)](tokens, logprobs, out_tokens, out_logprobs, out_tokens.stride(0), step, input_ids,
                                 positions, sample_positions, steps_left, rows, BLOCK=BLOCK, num_warps=4)
