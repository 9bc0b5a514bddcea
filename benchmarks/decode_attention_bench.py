"""Paged decode attention alone: the Triton kernel (several tile / warp settings) vs flashinfer's decode, against the
bandwidth roofline (K/V bytes read per call / measured copy bandwidth). Qwen2.5-1.5B heads (12 q, 2 kv, D 128),
page size 16, pages scattered in the pool, one layer's cache.

    python benchmarks/decode_attention_bench.py --out decode_attention.json

Prints one row per (batch, context, variant): microseconds per call, GB/s of K/V read, fraction of copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from opdgraph.kernels import paged_decode_attention as kernel

HEADS, KV_HEADS, DIM, PAGE = 12, 2, 128, 16


def time_call(function, repeats=50) -> float:
    """Seconds per call, CUDA events around `repeats` calls after two warm-up calls."""
    function()
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def copy_bandwidth(num_bytes=2 * 1024**3) -> float:
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), repeats=10)
    return 2 * num_bytes / seconds


def make_case(batch, context, dtype=torch.bfloat16):
    pages_per_seq = -(-context // PAGE)
    num_pages = batch * pages_per_seq + 1
    order = torch.randperm(num_pages - 1, device="cuda").to(torch.int32)
    table = order.view(batch, pages_per_seq)
    cache = torch.randn(2, num_pages, PAGE, KV_HEADS, DIM, device="cuda").to(dtype)
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    kv_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q, cache, kv_lens, table


def flashinfer_call(q, cache, kv_lens, table):
    import flashinfer

    batch, pages_per_seq = table.shape
    workspace = torch.zeros(128 * 1024**2, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True, backend="fa2")
    indptr = torch.arange(batch + 1, dtype=torch.int32) * pages_per_seq
    last = (kv_lens.cpu() - (pages_per_seq - 1) * PAGE).to(torch.int32)
    wrapper.plan(indptr, table.flatten().cpu(), last, HEADS, KV_HEADS, DIM, PAGE, q_data_type=q.dtype,
                 kv_data_type=cache.dtype, sm_scale=DIM**-0.5)
    return lambda: wrapper.run(q, (cache[0], cache[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("decode_attention.json"))
    parser.add_argument("--cases", type=int, default=4, help="how many of the (batch, context) cases to run")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    rows = []
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'batch':>5} {'ctx':>5} {'variant':<34} {'us':>8} {'GB/s':>7} {'roof%':>6}")
    for batch, context in [(128, 768), (32, 512), (128, 1280), (256, 768)][: args.cases]:
        q, cache, kv_lens, table = make_case(batch, context)
        kv_bytes = batch * context * KV_HEADS * DIM * 2 * cache.element_size()
        reference = None
        variants = {"flashinfer decode (tensor cores)": lambda: flashinfer_call(q, cache, kv_lens, table)}
        default_splits = kernel.num_splits_for(batch, KV_HEADS, context, q.device)
        for block_n, warps, stages, splits in [(32, 4, 2, default_splits), (64, 4, 2, default_splits),
                                               (16, 2, 2, default_splits), (32, 4, 3, default_splits),
                                               (64, 8, 2, default_splits), (32, 4, 2, 2 * default_splits),
                                               (64, 4, 3, 2 * default_splits), (32, 4, 2, 1), (64, 4, 2, 1),
                                               (64, 4, 2, 2), (128, 8, 2, default_splits)]:
            name = f"triton N{block_n} w{warps} s{stages} splits{splits}"
            variants[name] = (lambda b=block_n, w=warps, s=stages, n=splits: _triton_call(q, cache, kv_lens, table,
                                                                                            b, w, s, n))
        for name, build in variants.items():
            try:
                call = build()
                out = call()
                if reference is None:
                    reference = out.float()
                error = float((out.float() - reference).abs().max())
                seconds = time_call(call)
                row = dict(batch=batch, context=context, variant=name, us=seconds * 1e6,
                           gb_per_s=kv_bytes / seconds / 1e9, fraction_of_copy_bandwidth=kv_bytes / seconds / bandwidth,
                           max_abs_diff_vs_first=error)
                print(f"{batch:>5} {context:>5} {name:<34} {row['us']:>8.1f} {row['gb_per_s']:>7.0f} "
                      f"{100 * row['fraction_of_copy_bandwidth']:>5.1f}%  (max diff {error:.3g})", flush=True)
            except Exception:  # noqa: BLE001 -- one variant failing must not hide the others
                row = dict(batch=batch, context=context, variant=name, error=traceback.format_exc())
                print(row["error"], flush=True)
            rows.append(row)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, rows=rows),
                                   indent=1))


def _triton_call(q, cache, kv_lens, table, block_n, warps, stages, splits):
    """The kernel with explicit launch settings (the module's defaults are what the engine uses)."""
    settings = kernel.LaunchSettings(block_n=block_n, num_warps=warps, num_stages=stages)

    def call():
        return kernel.paged_decode_attention(q, cache, kv_lens, table, scale=DIM**-0.5, sliding_window=None,
                                             num_splits=splits, settings=settings)
    return call


if __name__ == "__main__":
    main()
