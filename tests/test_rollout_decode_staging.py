"""DecodeStaging (the numpy host path of CUDA-graph decode steps) against build_model_inputs + plan_arrays.

The scheduler runs real workloads (n > 1 forks with copy-on-write, preemptions, EOS finishes, mixed settings); at
every all-decode step the staged buffers must equal what the reference builders produce for the same batch, and
padding rows must touch only the scratch page. A stale page-table cache (a missed ``pages_version`` bump) or a
stale per-sequence constant would show up as a mismatch.
"""

from __future__ import annotations

import random

import pytest
import torch

from opdgraph.kernels.flashinfer_attention import plan_arrays
from opdgraph.rollout.batch_builder import build_model_inputs
from opdgraph.rollout.cuda_graphs import batch_lists
from opdgraph.rollout.decode_staging import FLOAT_ROW, INT_ROW, DecodeStaging
from opdgraph.rollout.kv_pool import PagePool
from opdgraph.rollout.request import Request, SamplingParams
from opdgraph.rollout.scheduler import Scheduler
from opdgraph.rollout.sequence import Sequence

PAGE_SIZE = 4
SETTINGS = [dict(), dict(greedy=True), dict(temperature=0.6, top_k=5), dict(top_p=0.8, min_p=0.05)]


def check_step(staging, batch, padded):
    """Compare every staged field with the reference builders for one decode batch."""
    count = len(batch.chunks)
    arrays = staging.stage(batch, padded)
    inputs = build_model_inputs(batch, PAGE_SIZE, torch.device("cpu"))
    reference = plan_arrays(*batch_lists(batch), PAGE_SIZE)
    ints, floats = staging.ints, staging.floats
    assert ints[INT_ROW["input_ids"], :count].tolist() == inputs.input_ids.tolist()
    assert ints[INT_ROW["positions"], :count].tolist() == inputs.positions.tolist()
    assert ints[INT_ROW["slot_mapping"], :count].tolist() == inputs.meta.slot_mapping.tolist()
    rows = inputs.sampling
    for name in ("seeds", "sample_indices", "top_k"):
        assert ints[INT_ROW[name], :count].tolist() == getattr(rows, name).tolist(), name
    assert ints[INT_ROW["sample_positions"], :count].tolist() == rows.positions.tolist()
    assert ints[INT_ROW["greedy"], :count].tolist() == rows.greedy.long().tolist()
    for name in ("temperatures", "top_p", "min_p"):
        assert floats[FLOAT_ROW[name], :count].tolist() == getattr(rows, name).tolist(), name
    assert staging.sampling_key == (rows.all_greedy, rows.any_greedy, rows.any_top_k, rows.any_top_p, rows.any_min_p)
    num_real = int(reference.kv_indptr[-1])
    assert arrays.kv_indptr[: count + 1].tolist() == reference.kv_indptr.tolist()
    assert arrays.kv_indices[:num_real].tolist() == reference.kv_indices.tolist()
    assert arrays.kv_last_page_len[:count].tolist() == reference.kv_last_page_len.tolist()
    assert arrays.qo_indptr.tolist() == list(range(padded + 1)) and arrays.is_decode
    # Padding rows: one token on the scratch page, greedy.
    scratch = staging.scratch_page
    assert arrays.kv_indices[num_real:].tolist() == [scratch] * (padded - count)
    assert arrays.kv_last_page_len[count:].tolist() == [1] * (padded - count)
    assert ints[INT_ROW["slot_mapping"], count:padded].tolist() == [scratch * PAGE_SIZE] * (padded - count)
    assert ints[INT_ROW["greedy"], count:padded].tolist() == [1] * (padded - count)


@pytest.mark.parametrize("num_pages, seed", [(200, 0), (26, 1), (18, 2)])  # roomy, tight (preemptions), tighter
def test_staged_decode_inputs_equal_the_reference_builders(num_pages, seed):
    """Forks, copy-on-write, preemption and finishes change page tables and rows; staging must follow them all."""
    rng = random.Random(seed)
    pool = PagePool(num_pages)
    scheduler = Scheduler(pool, page_size=PAGE_SIZE, max_num_seqs=8, prefill_token_budget=16)
    for i in range(7):
        params = SamplingParams(max_new_tokens=rng.randint(3, 20), eos_token_ids=(5,), **SETTINGS[i % 4])
        prompt = [rng.randint(1, 50) for _ in range(rng.randint(1, 11))]
        n = 2 if i % 3 == 0 else 1
        scheduler.add(Sequence(Request(f"r{i}", prompt, params, n=n, seed=1000 + i), list(range(n)), i))
    staging = DecodeStaging(8, PAGE_SIZE, scratch_page=num_pages, pin=False)
    checked = 0
    while scheduler.has_work():
        batch = scheduler.schedule()
        if all(chunk.is_decode for chunk in batch.chunks):
            count = len(batch.chunks)
            check_step(staging, batch, padded=min(8, 1 << (count - 1).bit_length()))
            checked += 1
        num_rows = sum(len(chunk.sequence.sample_indices) for chunk in batch.sampling_chunks)
        scheduler.update(batch, [rng.choice([5] + [7, 9, 11, 13, 17] * 6) for _ in range(num_rows)], [-1.0] * num_rows)
    assert checked > 5, checked
    if num_pages < 30:
        assert scheduler.num_preemptions > 0
