"""The decode-burst bookkeeping kernels (opdgraph.kernels.burst_state) against the torch ops they replace.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported).
Integer work: results must be equal, not close. Row counts below, at and above the kernels' block of 256 rows.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from opdgraph.kernels.burst_state import advance, decode_slots  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_state(rows: int, width: int, page_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    page_table = torch.randint(0, 1000, (rows, width), generator=generator, dtype=torch.int32)
    positions = torch.randint(0, width * page_size, (rows,), generator=generator)
    steps_left = torch.randint(0, 4, (rows,), generator=generator)  # about a quarter of the rows are done
    return [t.to(DEVICE) for t in (page_table, positions, steps_left)]


@pytest.mark.parametrize("rows, width, page_size", [(1, 1, 16), (7, 5, 3), (256, 9, 4), (300, 33, 16)])
def test_decode_slots_match_torch(rows, width, page_size):
    """A slot off by a page or an offset, an idle row not sent to the scratch slot, or a kv length not pos + 1
    would corrupt the cache or the attention of a burst."""
    page_table, positions, steps_left = random_state(rows, width, page_size, seed=rows)
    scratch_slot = 1000 * page_size
    slots, kv_lens = decode_slots(positions, steps_left, page_table, page_size, scratch_slot)
    page = page_table.gather(1, torch.div(positions, page_size, rounding_mode="floor")[:, None]).squeeze(1).long()
    expected = torch.where(steps_left > 0, page * page_size + positions % page_size, scratch_slot)
    assert slots.dtype == torch.int64 and kv_lens.dtype == torch.int32
    assert torch.equal(slots, expected)
    assert torch.equal(kv_lens, (positions + 1).to(torch.int32))


@pytest.mark.parametrize("rows", [3, 256, 300])
def test_advance_matches_torch(rows):
    """Tokens recorded at the wrong output row, a finished row advanced or fed a new token, or the step counter
    not moving on (every later step would overwrite the same row) would change a burst's tokens."""
    generator = torch.Generator().manual_seed(rows)
    max_rows, steps = rows + 5, 6  # outputs are views of wider buffers, as in DecodeBurst
    ints = torch.randint(0, 50, (4, max_rows), generator=generator).to(DEVICE)
    ints[3] = torch.randint(0, 3, (max_rows,), generator=generator).to(DEVICE)  # steps left, some 0
    out_tokens = torch.zeros(steps, max_rows, dtype=torch.int64, device=DEVICE)
    out_logprobs = torch.zeros(steps, max_rows, dtype=torch.float32, device=DEVICE)
    step = torch.tensor([2], device=DEVICE)
    tokens = torch.randint(0, 1000, (rows,), generator=generator).to(DEVICE)
    logprobs = -torch.rand(rows, generator=generator).to(DEVICE)
    expected_ints, expected_tokens, expected_logprobs = ints.clone(), out_tokens.clone(), out_logprobs.clone()

    input_ids, positions, sample_positions, steps_left = (expected_ints[i, :rows] for i in range(4))
    active = steps_left > 0
    expected_tokens[2, :rows] = tokens
    expected_logprobs[2, :rows] = logprobs
    input_ids.copy_(torch.where(active, tokens, input_ids))
    positions.add_(active.long())
    sample_positions.add_(active.long())
    steps_left.sub_(active.long())

    advance(tokens, logprobs, out_tokens[:, :rows], out_logprobs[:, :rows], step,
            *(ints[i, :rows] for i in range(4)))
    assert torch.equal(ints, expected_ints)
    assert torch.equal(out_tokens, expected_tokens)
    assert torch.equal(out_logprobs, expected_logprobs)
    assert step.item() == 3
