"""Triton bodies of the decode-burst bookkeeping kernels; only `opdgraph.kernels.burst_state` imports this module.

- ``slots_kernel``: per row, the cache slot of the fed token (from the row's page table, or the scratch slot when
  the row has no steps left) and the visible context length.
- ``advance_kernel``: one program for all rows (it reads the step counter and must bump it after every row has
  used it): records the step's tokens and log-probs at row ``step`` of the outputs and advances each active row.

Legend: R = rows of the burst (padded batch size), W = page-table width.
"""

import triton
import triton.language as tl


@triton.jit
def slots_kernel(positions_ptr, steps_left_ptr, page_table_ptr, table_row_stride, slots_ptr, kv_lens_ptr, R,
                 page_size, scratch_slot, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < R
    positions = tl.load(positions_ptr + rows, mask=inside, other=0)
    active = tl.load(steps_left_ptr + rows, mask=inside, other=0) > 0
    page = tl.load(page_table_ptr + rows.to(tl.int64) * table_row_stride + positions // page_size, mask=inside,
                   other=0).to(tl.int64)
    slots = tl.where(active, page * page_size + positions % page_size, scratch_slot)
    tl.store(slots_ptr + rows, slots, mask=inside)
    tl.store(kv_lens_ptr + rows, (positions + 1).to(tl.int32), mask=inside)


@triton.jit
def advance_kernel(tokens_ptr, logprobs_ptr, out_tokens_ptr, out_logprobs_ptr, out_row_stride, step_ptr,
                   input_ids_ptr, positions_ptr, sample_positions_ptr, steps_left_ptr, R, BLOCK: tl.constexpr):
    step = tl.load(step_ptr)
    for start in range(0, R, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        inside = rows < R
        tokens = tl.load(tokens_ptr + rows, mask=inside, other=0)
        tl.store(out_tokens_ptr + step * out_row_stride + rows, tokens, mask=inside)
        tl.store(out_logprobs_ptr + step * out_row_stride + rows, tl.load(logprobs_ptr + rows, mask=inside),
                 mask=inside)
        steps_left = tl.load(steps_left_ptr + rows, mask=inside, other=0)
        active = steps_left > 0
        advance = active.to(tl.int64)
        tl.store(input_ids_ptr + rows, tokens, mask=inside & active)
        tl.store(positions_ptr + rows, tl.load(positions_ptr + rows, mask=inside) + advance, mask=inside)
        tl.store(sample_positions_ptr + rows, tl.load(sample_positions_ptr + rows, mask=inside) + advance,
                 mask=inside)
        tl.store(steps_left_ptr + rows, steps_left - advance, mask=inside)
    tl.debug_barrier()  # every thread has read the step before any thread moves it on
    tl.store(step_ptr, step + 1)
