"""How far the decode step's GEMMs are from the bandwidth roofline, and whether a skinny Triton GEMM closes the gap.

Issue 19's bs128 decode profile spends 1.39 ms/step in GEMMs whose weights alone need 0.73 ms at the measured copy
bandwidth. This probe times each GEMM shape of a Qwen2.5-1.5B decode step (qkv, o, gate/up packed, down, lm_head) at
M = 64 / 128 / 256 rows, inside CUDA graphs (so launch overhead is what a burst sees, not Python's), over 28 distinct
weight copies per shape (so the 50 MB L2 holds none of them between launches, as in a real step):

- cuBLAS on the nn.Linear layout (x @ W^T, W [N, K]), what the model runs today;
- cuBLAS on the transposed layout (x @ W, W [K, N]);
- a split-K Triton GEMM over a small sweep of tiles (the partial sums reduced by one torch sum when split > 1).

Then one graph of a whole step's GEMM sequence (28 layers + lm_head) with cuBLAS and with each shape's best Triton
config, which is the figure to set beside the profile. Not a test: prints a table and writes JSON (--out).

    python benchmarks/decode_gemm_probe.py --out decode_gemm_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.runtime.errors

from rollout_gpu import copy_bandwidth

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, KV_WIDTH = 1536, 8960, 151936, 28, 256
SHAPES = {  # name: (K, N) of y[M, N] = x[M, K] @ W^T
    "qkv": (HIDDEN, HIDDEN + 2 * KV_WIDTH),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
    "lm_head": (HIDDEN, VOCAB),
}
CONFIGS = [  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_M is min(M, 128) rounded to 64
    (n, k, s, w, st) for n, k in ((64, 128), (128, 64), (128, 128), (64, 256), (32, 256))
    for s in (1, 2, 4, 8) for w, st in ((4, 4), (8, 3)) if w == 4 or n == 128
]


@triton.jit
def _skinny_gemm(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, stride_x, stride_w, stride_out, stride_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_OUT: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_k * k_per_split
    for k in range(start, tl.minimum(start + k_per_split, K), BLOCK_K):
        a = tl.load(x_ptr + rows[:, None] * stride_x + (k + inner)[None, :],
                    mask=(rows[:, None] < M) & ((k + inner)[None, :] < K), other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + (k + inner)[None, :],
                    mask=(cols[:, None] < N) & ((k + inner)[None, :] < K), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    target = out_ptr + pid_k * stride_split + rows[:, None] * stride_out + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if FP32_OUT:
        tl.store(target, acc, mask=mask)
    else:
        tl.store(target, acc.to(tl.bfloat16), mask=mask)


def triton_gemm(x, w, config, partial=None):
    """x [M, K] @ w[N, K]^T -> [M, N] bf16 with one (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) config."""
    block_n, block_k, split, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    block_m = 64 if m <= 64 else 128
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    if split == 1:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        _skinny_gemm[grid](x, w, out, m, n, k, k_per_split, x.stride(0), w.stride(0), out.stride(0), 0,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP32_OUT=False,
                           num_warps=warps, num_stages=stages)
        return out
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if partial is None else partial
    _skinny_gemm[grid](x, w, partial, m, n, k, k_per_split, x.stride(0), w.stride(0), n, m * n,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP32_OUT=True,
                       num_warps=warps, num_stages=stages)
    return partial.sum(0).to(torch.bfloat16)


def graph_ms(fn, replays=20) -> float:
    """Milliseconds of one call of fn, captured in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def shape_row(name, m, weights, bandwidth):
    k, n = SHAPES[name]
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    transposed = [w.t().contiguous() for w in weights]
    ideal_ms = (n * k + m * k + m * n) * 2 / bandwidth * 1e3
    copies = len(weights)
    row = {"shape": name, "M": m, "K": k, "N": n, "ideal_us": ideal_ms * 1e3}
    row["cublas_us"] = graph_ms(lambda: [x @ w.t() for w in weights]) / copies * 1e3
    row["cublas_kn_us"] = graph_ms(lambda: [x @ w for w in transposed]) / copies * 1e3
    del transposed
    reference = (x.double() @ weights[0].double().t())
    best = None
    for config in CONFIGS:
        try:
            got = triton_gemm(x, weights[0], config).double()
        except triton.runtime.errors.OutOfResources:  # too many stages of too large tiles for shared memory
            continue
        error = ((got - reference).abs().max() / reference.abs().max()).item()
        if error > 2e-2:
            raise AssertionError(f"{name} M={m} config {config}: relative error {error:.3g}")
        us = graph_ms(lambda: [triton_gemm(x, w, config) for w in weights]) / copies * 1e3
        if best is None or us < best[1]:
            best = (config, us)
    row["triton_us"], row["triton_config"] = best[1], list(best[0])
    for key in ("cublas", "cublas_kn", "triton"):
        row[f"{key}_roofline"] = row["ideal_us"] / row[f"{key}_us"]
    return row


def step_sequence(m, weights_by_shape, configs_by_shape):
    """One decode step's GEMMs (28 layers x qkv, o, gate_up, down, then lm_head), cuBLAS and best-Triton, in ms."""
    xs = {name: torch.randn(m, SHAPES[name][0], dtype=torch.bfloat16, device="cuda") for name in SHAPES}

    def run(use_triton):
        for layer in range(LAYERS):
            for name in ("qkv", "o", "gate_up", "down"):
                w = weights_by_shape[name][layer % len(weights_by_shape[name])]
                triton_gemm(xs[name], w, configs_by_shape[name]) if use_triton else xs[name] @ w.t()
        w = weights_by_shape["lm_head"][0]
        triton_gemm(xs["lm_head"], w, configs_by_shape["lm_head"]) if use_triton else xs["lm_head"] @ w.t()

    return graph_ms(lambda: run(False)), graph_ms(lambda: run(True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("decode_gemm_probe.json"))
    parser.add_argument("--batch-sizes", default="64,128,256")
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth("cuda")
    card = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    print(f"{card}: copy {bandwidth / 1e9:.0f} GB/s")
    weights = {name: [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
                      for _ in range(1 if name == "lm_head" else LAYERS)] for name, (k, n) in SHAPES.items()}
    rows, steps = [], []
    print(f"{'shape':8} {'M':>4} {'ideal us':>9} {'cuBLAS':>8} {'cuBLAS KN':>10} {'Triton':>8}  best Triton config")
    for m in (int(b) for b in args.batch_sizes.split(",")):
        best = {}
        for name in SHAPES:
            row = shape_row(name, m, weights[name], bandwidth)
            rows.append(row)
            best[name] = tuple(row["triton_config"])
            print(f"{name:8} {m:4} {row['ideal_us']:9.1f} {row['cublas_us']:6.1f} {row['cublas_roofline']:.0%}"
                  f" {row['cublas_kn_us']:6.1f} {row['cublas_kn_roofline']:.0%}"
                  f" {row['triton_us']:6.1f} {row['triton_roofline']:.0%}  {row['triton_config']}", flush=True)
        cublas_ms, triton_ms = step_sequence(m, weights, best)
        ideal_ms = sum(r["ideal_us"] * (1 if r["shape"] == "lm_head" else LAYERS)
                       for r in rows if r["M"] == m) / 1e3
        steps.append({"M": m, "ideal_ms": ideal_ms, "cublas_ms": cublas_ms, "triton_ms": triton_ms})
        print(f"whole step's GEMMs M={m}: ideal {ideal_ms:.3f} ms, cuBLAS {cublas_ms:.3f} ms "
              f"({ideal_ms / cublas_ms:.0%}), best Triton per shape {triton_ms:.3f} ms ({ideal_ms / triton_ms:.0%})")
    args.out.write_text(json.dumps({"card": card, "copy_bytes_per_s": bandwidth, "shapes": rows, "steps": steps},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
