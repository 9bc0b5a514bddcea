"""Latency of the small all-reduces a tensor-parallel decode step would need (2 per layer of a [batch, hidden] bf16
activation), on 2 GPUs: NCCL eagerly and inside a CUDA graph, and PyTorch symmetric memory's one-shot / two-shot
all-reduce (peer loads over NVLink; multicast stays off: TORCH_SYMM_MEM_DISABLE_MULTICAST=1). A feasibility probe
for splitting rollout across GPUs, not part of the product; prints one JSON line per (method, rows) from rank 0.

    torchrun --standalone --nproc-per-node 2 benchmarks/allreduce_probe.py [--hidden 1536] [--rows 64,128]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

PER_GRAPH = 56  # a 28-layer model's two all-reduces per layer: one decode step's worth


def _time_graph(step, repeats: int = 20) -> float:
    """Seconds per call of `step` when PER_GRAPH calls are captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(PER_GRAPH):
            step()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / (repeats * PER_GRAPH)


def _time_eager(step, repeats: int = 300) -> float:
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--rows", default="64,128")
    args = parser.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    group_name = dist.group.WORLD.group_name
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        data = torch.randn(rows, args.hidden, device=device, dtype=torch.bfloat16)
        expected = data.clone()
        dist.all_reduce(expected)
        row = {"rows": rows, "hidden": args.hidden, "bytes": data.numel() * 2}
        row["nccl_eager_us"] = 1e6 * _time_eager(lambda: dist.all_reduce(data.clone()))
        work = data.clone()
        row["nccl_graph_us"] = 1e6 * _time_graph(lambda: dist.all_reduce(work))
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(rows, args.hidden, device=device, dtype=torch.bfloat16)
            symm_mem.rendezvous(buffer, group_name)
            buffer.copy_(data)
            out = torch.empty_like(data)
            torch.ops.symm_mem.one_shot_all_reduce_out(buffer, "sum", group_name, out)
            torch.cuda.synchronize()
            row["one_shot_max_error"] = (out.float() - expected.float()).abs().max().item()
            row["one_shot_graph_us"] = 1e6 * _time_graph(
                lambda: torch.ops.symm_mem.one_shot_all_reduce_out(buffer, "sum", group_name, out))
            row["one_shot_copy_in_graph_us"] = 1e6 * _time_graph(
                lambda: (buffer.copy_(data), torch.ops.symm_mem.one_shot_all_reduce_out(buffer, "sum", group_name,
                                                                                        out)))
            buffer.copy_(data)
            torch.ops.symm_mem.two_shot_all_reduce_(buffer, "sum", group_name)
            torch.cuda.synchronize()
            row["two_shot_max_error"] = (buffer.float() - expected.float()).abs().max().item()
            row["two_shot_graph_us"] = 1e6 * _time_graph(
                lambda: torch.ops.symm_mem.two_shot_all_reduce_(buffer, "sum", group_name))
        except Exception as error:  # an op missing in this torch build: report and keep the NCCL numbers
            row["symm_mem_error"] = f"{type(error).__name__}: {error}"[:300]
        results.append(row)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
