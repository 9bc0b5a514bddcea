"""The Triton paged decode attention against the plain-torch paged reference (TRITON_INTERPRET=1 on CPU).

Without CUDA the kernel runs in Triton's CPU interpreter, in float32 with IEEE dots, so it must match the reference
closely; on CUDA (GPU-marked run) bf16 inputs are compared at bf16 tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from opdgraph.kernels import paged_decode_attention as kernel  # noqa: E402
from opdgraph.kernels.paged_decode_attention import (  # noqa: E402
    LaunchSettings,
    TritonDecodeBackend,
    kv_heads_per_program,
    num_splits_for,
    paged_decode_attention,
)
from opdgraph.models.attention_backend import TorchReferenceBackend  # noqa: E402
from opdgraph.models.attention_metadata import PagedMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_case(kv_lens, *, num_heads, num_kv_heads, head_dim, page_size, dtype, seed=0, shuffle_pages=True):
    """A cache holding each sequence's context on scattered pages, plus one query per sequence."""
    generator = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-length // page_size) for length in kv_lens]
    num_pages = sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=generator) if shuffle_pages else torch.arange(num_pages)
    width = max(pages_per_seq) + 2
    table = torch.full((len(kv_lens), width), num_pages - 1, dtype=torch.int32)
    used = 0
    for seq, count in enumerate(pages_per_seq):
        table[seq, :count] = order[used : used + count].to(torch.int32)
        used += count
    cache = torch.randn(2, num_pages, page_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    q = torch.randn(len(kv_lens), num_heads, head_dim, generator=generator).to(dtype)
    return q.to(DEVICE), cache.to(DEVICE), torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE), table.to(DEVICE)


def _reference(q, cache, kv_lens, table, *, scale, sliding_window):
    """The torch backend's attention over the same cache (its K/V write is made a no-op by writing the cache's own
    value at each sequence's last slot back into it)."""
    page_size = cache.shape[2]
    last = (kv_lens - 1).long()
    pages = table.long().gather(1, (last // page_size)[:, None]).squeeze(1)
    slots = pages * page_size + last % page_size
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    k, v = flat[0, slots].clone(), flat[1, slots].clone()
    ones = torch.ones_like(kv_lens)
    meta = PagedMetadata(query_lens=ones, cu_query_lens=torch.arange(len(kv_lens) + 1, dtype=torch.int32,
                                                                     device=q.device),
                         kv_lens=kv_lens, page_table=table, slot_mapping=slots, page_size=page_size)
    return TorchReferenceBackend().paged(q, k, v, meta, cache.clone(), scale=scale, sliding_window=sliding_window)


# Launch variants the engine may run (benchmarks/decode_variants.py): a program per kv head or per block of kv
# heads (block-diagonal queries), either grid order, small and large tiles.
LAUNCHES = [LaunchSettings(), LaunchSettings(kv_heads_per_program=0), LaunchSettings(head_major=True, block_n=16),
            LaunchSettings(kv_heads_per_program=2, head_major=True, block_n=64),
            LaunchSettings(merge_in_kernel=True), LaunchSettings(kv_heads_per_program=0, merge_in_kernel=True)]
LAUNCH_IDS = ["default", "all-heads", "head-major-16", "2-heads-64", "merge-in-kernel", "all-heads-merge-in-kernel"]


# The default launch over every shape and split count; the others (interpreted slowly) over the shapes that tell
# layouts apart: one query head per kv head, and several kv heads per program.
FLOAT32_CASES = [(splits, shape, LAUNCHES[0]) for splits in (1, 3, 8)
                 for shape in ((4, 2, 16), (6, 1, 32), (2, 2, 16), (12, 4, 16))]
FLOAT32_CASES += [(splits, shape, settings) for settings in LAUNCHES[1:] for splits in (1, 3)
                  for shape in ((2, 2, 16), (12, 4, 16))]


@pytest.mark.parametrize("num_splits, shape, settings", FLOAT32_CASES,
                         ids=[f"{LAUNCH_IDS[LAUNCHES.index(c[2])]}-{c[0]}-splits-{c[1]}" for c in FLOAT32_CASES])
def test_matches_reference_float32(num_splits, shape, settings):
    """Split-KV decode equals the reference for lengths shorter than, equal to and longer than a tile, pages
    scattered in the pool, grouped and ungrouped heads, one or several kv heads per program; would fail on a wrong
    page gather, a bad split merge, an empty split producing NaN, a query head reading another kv head's columns
    (block-diagonal queries) or a program id read from the wrong grid axis."""
    num_heads, num_kv_heads, head_dim = shape
    kv_lens = [1, 5, 16, 33, 70]
    q, cache, lens, table = _random_case(kv_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                         head_dim=head_dim, page_size=4, dtype=torch.float32)
    scale = head_dim**-0.5
    arrivals = torch.zeros(len(kv_lens) * num_kv_heads, dtype=torch.int32, device=DEVICE)
    for _ in range(2 if settings.merge_in_kernel else 1):  # a second call reuses the counters the first left
        got = paged_decode_attention(q, cache, lens, table, scale=scale, sliding_window=None,
                                     num_splits=num_splits, settings=settings, arrivals=arrivals)
        want = _reference(q, cache, lens, table, scale=scale, sliding_window=None)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        assert not arrivals.any()


def test_kv_heads_per_program_is_a_power_of_two_divisor_within_the_tile():
    """A block of kv heads must divide Hkv, be a power of two (Triton tile widths) and keep the tile <= 256 columns;
    otherwise the grid would skip heads or the kernel would not compile."""
    assert kv_heads_per_program(1, 8, 128) == 1
    assert kv_heads_per_program(0, 2, 128) == 2
    assert kv_heads_per_program(0, 8, 128) == 2
    assert kv_heads_per_program(0, 4, 64) == 4
    assert kv_heads_per_program(0, 3, 64) == 1
    assert kv_heads_per_program(0, 6, 32) == 2
    assert kv_heads_per_program(4, 2, 16) == 2


def test_backend_reads_settings_of_its_batch_size():
    """A per-batch-size override (what a tuned table installs) changes that size's splits and nobody else's."""
    backend = TritonDecodeBackend(num_kv_heads=2, max_context=4096, device=torch.device("cpu"))
    default = backend.launch(8, 128)
    kernel.SETTINGS_BY_BATCH[8] = LaunchSettings(num_splits=5, kv_heads_per_program=0)
    try:
        assert backend.launch(8, 128) == (kernel.SETTINGS_BY_BATCH[8], 5)
        assert backend.launch(16, 128)[0] == kernel.DEFAULT_SETTINGS
    finally:
        del kernel.SETTINGS_BY_BATCH[8]
    assert backend.launch(8, 128) == default


@pytest.mark.parametrize("window", [1, 4, 9])
def test_sliding_window(window):
    """Sliding layers see only the last `window` keys: would fail if the window bound were off by one."""
    kv_lens = [3, 12, 40]
    q, cache, lens, table = _random_case(kv_lens, num_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
                                         dtype=torch.float32, seed=1)
    for settings in LAUNCHES[:2]:
        got = paged_decode_attention(q, cache, lens, table, scale=0.3, sliding_window=window, num_splits=4,
                                     settings=settings)
        want = _reference(q, cache, lens, table, scale=0.3, sliding_window=window)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_backend_writes_kv_then_attends():
    """The backend's paged(): the new token's K/V land at slot_mapping and the query sees them (same as the torch
    backend, which is run on an identical copy of the cache)."""
    kv_lens = [2, 9, 17]
    q, cache, lens, table = _random_case(kv_lens, num_heads=4, num_kv_heads=2, head_dim=16, page_size=4,
                                         dtype=torch.float32, seed=2)
    last = (lens - 1).long()
    slots = table.long().gather(1, (last // 4)[:, None]).squeeze(1) * 4 + last % 4
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(3, 2, 16, generator=generator).to(DEVICE)
    v = torch.randn(3, 2, 16, generator=generator).to(DEVICE)
    meta = PagedMetadata(query_lens=torch.ones_like(lens), cu_query_lens=torch.arange(4, dtype=torch.int32,
                                                                                    device=DEVICE),
                         kv_lens=lens, page_table=table, slot_mapping=slots, page_size=4)
    ours, theirs = cache.clone(), cache.clone()
    backend = TritonDecodeBackend(num_kv_heads=2, max_context=64, device=DEVICE)
    got = backend.paged(q, k, v, meta, ours, scale=0.25, sliding_window=None)
    want = TorchReferenceBackend().paged(q, k, v, meta, theirs, scale=0.25, sliding_window=None)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_num_splits_bounds():
    """Splits never exceed the tiles of the longest context and are at least one."""
    assert num_splits_for(1, 1, 10, torch.device("cpu")) == 1
    assert num_splits_for(1, 1, 10_000, torch.device("cpu")) >= 2
    assert num_splits_for(4096, 8, 10_000, torch.device("cpu")) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tensor-core path needs CUDA")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("settings", LAUNCHES, ids=LAUNCH_IDS)
def test_bf16_and_fp8_cache_on_gpu(cache_dtype, settings):
    """bf16 queries over a bf16 or fp8 cache at Qwen2.5-1.5B head shapes against the reference (bf16 tolerance),
    with every launch layout on real tensor cores (block-diagonal queries included)."""
    kv_lens = [1, 17, 255, 1024, 1300]
    q, cache, lens, table = _random_case(kv_lens, num_heads=12, num_kv_heads=2, head_dim=128, page_size=16,
                                         dtype=torch.bfloat16, seed=4)
    cache = cache.to(cache_dtype)
    got = paged_decode_attention(q, cache, lens, table, scale=128**-0.5, sliding_window=None,
                                 num_splits=num_splits_for(5, 2, 1300, DEVICE, settings), settings=settings)
    want = _reference(q, cache.to(torch.bfloat16), lens, table, scale=128**-0.5, sliding_window=None)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a race shows only with programs running concurrently")
@pytest.mark.parametrize("settings", [LaunchSettings(merge_in_kernel=True, num_splits=8),
                                      LaunchSettings(kv_heads_per_program=0, merge_in_kernel=True, num_splits=5)],
                         ids=["per-head-8-splits", "all-heads-5-splits"])
def test_in_kernel_merge_is_race_free_on_gpu(settings):
    """The in-kernel merge reads other programs' partials after an arrival counter says all are written: a missing
    barrier or fence would let the last program read a stale partial now and then. 200 replays of a captured
    graph must give identical bits each time, close to the two-kernel merge, with every counter back at 0."""
    kv_lens = [1, 17, 255, 1024, 1300] * 26  # 130 sequences: many programs in flight at once
    q, cache, lens, table = _random_case(kv_lens, num_heads=12, num_kv_heads=2, head_dim=128, page_size=16,
                                         dtype=torch.bfloat16, seed=5)
    arrivals = torch.zeros(len(kv_lens) * 2, dtype=torch.int32, device=DEVICE)
    splits = settings.num_splits

    def call():
        return paged_decode_attention(q, cache, lens, table, scale=128**-0.5, sliding_window=None,
                                      num_splits=splits, settings=settings, arrivals=arrivals)

    first = call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    outputs = torch.empty(200, *first.shape, dtype=first.dtype, device=DEVICE)
    with torch.cuda.graph(graph):
        out = call()
    for index in range(200):
        graph.replay()
        outputs[index].copy_(out)
    assert torch.equal(outputs, first.expand_as(outputs))
    assert not arrivals.any()
    two_kernels = paged_decode_attention(q, cache, lens, table, scale=128**-0.5, sliding_window=None,
                                         num_splits=splits, settings=LaunchSettings(
                                             kv_heads_per_program=settings.kv_heads_per_program))
    torch.testing.assert_close(first.float(), two_kernels.float(), rtol=1e-2, atol=1e-2)
