"""CPU tests of the pure pieces of the GPU rollout path: flashinfer plan arrays, KV writes, the graph batch ladder."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from opdgraph.kernels.flashinfer_attention import plan_arrays, window_left, write_kv
from opdgraph.models.attention_backend import TorchReferenceBackend, attend_one_sequence
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.rollout.cuda_graphs import batch_lists, batch_size_ladder, padded_batch_size


def attend_through_plan(q, kv_cache, arrays, *, scale, sliding_window):
    """Paged attention that finds the cache only through PlanArrays, the way flashinfer reads them."""
    page_size = kv_cache.shape[2]
    outputs = []
    qo, kv_ptr, indices, last = (t.tolist() for t in (arrays.qo_indptr, arrays.kv_indptr, arrays.kv_indices,
                                                       arrays.kv_last_page_len))
    for s in range(len(last)):
        pages = torch.tensor(indices[kv_ptr[s]:kv_ptr[s + 1]])
        context_len = (len(pages) - 1) * page_size + last[s]
        keys = kv_cache[0, pages].flatten(0, 1)[:context_len]
        values = kv_cache[1, pages].flatten(0, 1)[:context_len]
        query_len = qo[s + 1] - qo[s]
        positions = torch.arange(context_len - query_len, context_len)
        outputs.append(attend_one_sequence(q[qo[s]:qo[s + 1]], keys, values, positions, scale=scale,
                                           sliding_window=sliding_window))
    return torch.cat(outputs)


def random_paged_batch(query_lens, kv_lens, page_size, num_pages, seed):
    """A metadata object over randomly chosen, distinct pages (sequence order != page order), padded page table."""
    rng = random.Random(seed)
    free = list(range(num_pages))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-kv_len // page_size))] for kv_len in kv_lens]
    width = max(len(t) for t in tables)
    slots = [table[p // page_size] * page_size + p % page_size
             for q_len, kv_len, table in zip(query_lens, kv_lens, tables) for p in range(kv_len - q_len, kv_len)]
    cu = [0]
    for q_len in query_lens:
        cu.append(cu[-1] + q_len)
    meta = PagedMetadata(
        query_lens=torch.tensor(query_lens, dtype=torch.int32), cu_query_lens=torch.tensor(cu, dtype=torch.int32),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        page_table=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64), page_size=page_size)
    return meta, tables


@pytest.mark.parametrize("query_lens, kv_lens, page_size", [
    ([1, 1, 1], [5, 8, 9], 4),  # decode; contexts ending mid-page, on a page boundary, one past it
    ([7, 1, 3], [7, 12, 3], 4),  # mixed: fresh prompt, decode, chunk continuing a prefill
    ([1], [1], 1),  # page size 1
    ([16, 1], [16, 33], 16),  # full last page
])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_plan_arrays_reproduce_reference_attention(query_lens, kv_lens, page_size, sliding_window):
    """Wrong indptr / page indices / last-page lengths (what flashinfer reads) would attend to the wrong keys."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    meta, tables = random_paged_batch(query_lens, kv_lens, page_size, num_pages=32, seed=1)
    kv_cache = torch.zeros(2, 32, page_size, kv_heads, dim, dtype=torch.float64)
    # Fill the whole context of every sequence (earlier tokens first), then the reference writes the new ones.
    for table, kv_len, q_len in zip(tables, kv_lens, query_lens):
        for position in range(kv_len - q_len):
            kv_cache[:, table[position // page_size], position % page_size] = torch.randn(2, kv_heads, dim,
                                                                                         dtype=torch.float64)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, heads, dim, dtype=torch.float64)
    k, v = torch.randn(2, num_tokens, kv_heads, dim, dtype=torch.float64)
    expected = TorchReferenceBackend().paged(q, k, v, meta, kv_cache, scale=0.3, sliding_window=sliding_window)
    arrays = plan_arrays(query_lens, kv_lens, tables, page_size)
    assert arrays.kv_indices.dtype == torch.int32 and arrays.max_query_len == max(query_lens)
    actual = attend_through_plan(q, kv_cache, arrays, scale=0.3, sliding_window=sliding_window)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_plan_arrays_cut_page_tables_to_the_context():
    """Pages listed past a sequence's context (padding, -1) would be handed to flashinfer as real pages."""
    arrays = plan_arrays([1, 2], [4, 5], [[7, -1, -1], [3, 9, 2]], page_size=4)
    assert arrays.kv_indices.tolist() == [7, 3, 9]
    assert arrays.kv_indptr.tolist() == [0, 1, 3]
    assert arrays.qo_indptr.tolist() == [0, 1, 3]
    assert arrays.kv_last_page_len.tolist() == [4, 1]
    assert not arrays.is_decode


def test_window_left_matches_reference_visibility():
    """An off-by-one here would let sliding layers see one key too many or too few."""
    assert window_left(None) == -1
    # Reference: key visible iff query - sliding_window < key <= query; flashinfer: query - window_left <= key.
    for sliding_window in (1, 2, 4096):
        query = 10_000
        first_visible = query - sliding_window + 1
        assert query - window_left(sliding_window) == first_visible


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_write_kv_puts_tokens_at_their_slots(dtype):
    """K/V written to the wrong slot (or float8 values mangled by the byte view) would corrupt the cache."""
    page_size, kv_heads, dim = 4, 2, 8
    cache = torch.zeros(2, 5, page_size, kv_heads, dim, dtype=dtype)
    k, v = torch.randn(2, 3, kv_heads, dim) * 4
    slots = torch.tensor([19, 0, 6])
    write_kv(cache, k, v, slots)
    flat = cache.view(2, -1, kv_heads, dim).float()
    torch.testing.assert_close(flat[0, slots], k.to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(flat[1, slots], v.to(dtype).float(), rtol=0, atol=0)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert flat[:, untouched].abs().sum() == 0


@pytest.mark.parametrize("max_num_seqs, expected", [
    (1, [1]), (2, [1, 2]), (5, [1, 2, 4, 5]), (64, [1, 2, 4, 8, 16, 32, 64]),
    (1000, [1, 2, 4, 8, 16, 32, 64, 128, 256]),
])
def test_batch_size_ladder(max_num_seqs, expected):
    """A missing rung would send decode batches to eager mode; one above max_num_seqs would waste capture memory."""
    assert batch_size_ladder(max_num_seqs) == expected


def test_padded_batch_size_picks_the_smallest_rung_that_fits():
    """Padding to a smaller rung would drop sequences; to a larger one would waste work."""
    ladder = [1, 2, 4, 8, 12]
    assert [padded_batch_size(n, ladder) for n in (1, 2, 3, 4, 5, 8, 9, 12)] == [1, 2, 4, 4, 8, 8, 12, 12]
    assert padded_batch_size(13, ladder) is None


def test_batch_lists_pad_with_one_token_rows_on_the_scratch_page():
    """Padding rows must read only the scratch page (never a live sequence's page) and count one token."""
    chunks = [SimpleNamespace(num_tokens=1, start=9, sequence=SimpleNamespace(pages=[4, 1, 7])),
              SimpleNamespace(num_tokens=1, start=2, sequence=SimpleNamespace(pages=[3]))]
    query_lens, kv_lens, tables = batch_lists(SimpleNamespace(chunks=chunks), pad_to=4, scratch_page=99)
    assert query_lens == [1, 1, 1, 1]
    assert kv_lens == [10, 3, 1, 1]
    assert tables == [[4, 1, 7], [3], [99], [99]]
    arrays = plan_arrays(query_lens, kv_lens, tables, page_size=4)
    assert arrays.kv_indices.tolist() == [4, 1, 7, 3, 99, 99]
    assert arrays.is_decode
