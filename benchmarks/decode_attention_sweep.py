"""The Triton paged decode-attention kernel alone over its launch settings, per batch size, to pick the settings
the decode bursts should capture (benchmarks/decode_variants.py runs this first and uses the winners).

Qwen2.5-1.5B heads (12 q, 2 kv, D 128, kernels/paged_decode_attention.py), page size 16, pages scattered. One
call reads one layer's K/V; several copies of the cache are cycled so that no call finds its K/V in L2 (the model's
28 layers do not either), and the calls are timed as a captured CUDA graph, like the bursts. Each setting is timed
at two contexts whose mean is the mean context of the run, and ranked by the sum; a setting whose output differs
from the default's by more than bf16 noise is reported and never picked. Settings: tile (keys per tile, pipeline
stages), layout (one program per kv head, grid in either order, or one program per sequence taking both kv heads:
whole contiguous token rows), the number of splits, and whether the splits are merged by a second kernel or by the
last split program (merge_in_kernel).

    python benchmarks/decode_attention_sweep.py --batch-sizes 64,128,256 --contexts 512,1024
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention_bench import DIM, KV_HEADS, copy_bandwidth, make_case  # noqa: E402

from opdgraph.kernels import paged_decode_attention as kernel  # noqa: E402

LAYOUTS = {"per-head": dict(kv_heads_per_program=1), "per-head head-major": dict(head_major=True),
           "all-heads": dict(kv_heads_per_program=0)}
TILES = [dict(block_n=32, num_stages=2), dict(block_n=64, num_stages=2), dict(block_n=32, num_stages=3),
         dict(block_n=64, num_stages=3)]
SPLITS = [1, 2, 3, 4, 6, 8]
COLD_BYTES = 256 * 1024**2  # cycle cache copies until a round of calls reads this much (more than the L2)
TOLERANCE = 2e-2  # bf16 outputs of any two correct settings agree to this


def label(settings: kernel.LaunchSettings) -> str:
    layout = "all-heads" if settings.kv_heads_per_program != 1 else "per-head"
    splits = settings.num_splits or f"{settings.programs_per_sm}/SM"
    merged = " merged in" if settings.merge_in_kernel else ""
    return (f"{layout}{' head-major' if settings.head_major else ''} N{settings.block_n} "
            f"S{settings.num_stages} W{settings.num_warps} splits {splits}{merged}")


def candidates() -> list[kernel.LaunchSettings]:
    found = [kernel.DEFAULT_SETTINGS]
    for layout in LAYOUTS.values():
        for tile in TILES:
            for splits in SPLITS:
                for merge_in_kernel in (False, True) if splits > 1 else (False,):
                    found.append(replace(kernel.DEFAULT_SETTINGS, **layout, **tile, num_splits=splits,
                                         merge_in_kernel=merge_in_kernel))
    return found


def time_graphed(call, copies: int, repeats: int) -> float:
    """Seconds per call: `repeats` calls cycling through the cache copies, captured in one CUDA graph (as the
    bursts run them: no Python launch overhead, the same gaps between kernels) and replayed twice after a warm
    replay. Eager timing would measure the host for the small cases (a Triton launch costs the host tens of us)."""
    for index in range(copies):  # compiles outside the capture
        call(index)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(repeats):
            call(index % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / 1000 / (2 * repeats)


def sweep(batch_sizes, contexts, bandwidth: float, repeats: int = 24, log=print) -> tuple[list, dict]:
    """(rows, {batch size: fastest correct LaunchSettings})."""
    rows, tuned = [], {}
    for batch in batch_sizes:
        cases = []
        for context in contexts:
            kv_bytes = batch * context * KV_HEADS * DIM * 2 * 2
            copies = max(1, min(8, math.ceil(COLD_BYTES / kv_bytes)))
            cases.append((context, kv_bytes, [make_case(batch, context) for _ in range(copies)]))
        reference = None
        best = None
        arrivals = torch.zeros(batch * KV_HEADS, dtype=torch.int32, device="cuda")  # merge_in_kernel's counters
        for settings in candidates():
            row = dict(batch=batch, label=label(settings), settings=asdict(settings), us=[], fraction=[])
            try:
                outputs = []
                for context, kv_bytes, copies in cases:
                    splits = kernel.num_splits_for(batch, KV_HEADS, context, torch.device("cuda"), settings, DIM)

                    def call(index, copies=copies, splits=splits, settings=settings, arrivals=arrivals):
                        q, cache, kv_lens, table = copies[index]
                        return kernel.paged_decode_attention(q, cache, kv_lens, table, scale=DIM**-0.5,
                                                             sliding_window=None, num_splits=splits,
                                                             settings=settings, arrivals=arrivals)

                    outputs.append(call(0).float())
                    seconds = time_graphed(call, len(copies), repeats)
                    row["us"].append(seconds * 1e6)
                    row["fraction"].append(kv_bytes / seconds / bandwidth)
                reference = reference or outputs
                row["max_diff_vs_default"] = max(float((o - r).abs().max()) for o, r in zip(outputs, reference))
                row["total_us"] = sum(row["us"])
                if row["max_diff_vs_default"] <= TOLERANCE and (best is None or row["total_us"] < best[0]):
                    best = (row["total_us"], settings)
                log(f"{batch:>4} {row['label']:<44} " + " ".join(f"{us:7.1f} us {100 * f:5.1f}%" for us, f in
                                                                 zip(row["us"], row["fraction"]))
                    + f"  diff {row['max_diff_vs_default']:.3g}")
            except Exception as error:  # noqa: BLE001 -- a setting that fails to compile must not stop the sweep
                row["error"] = f"{type(error).__name__}: {error}"
                log(f"{batch:>4} {row['label']:<44} ERROR {row['error'][:120]}")
            rows.append(row)
        tuned[batch] = best[1]
        del cases
        torch.cuda.empty_cache()
    return rows, tuned


def table_literal(tuned: dict) -> str:
    """The winners as the SETTINGS_BY_BATCH literal to commit in kernels/paged_decode_attention.py."""
    default = asdict(kernel.LaunchSettings())
    lines = []
    for batch, settings in sorted(tuned.items()):
        changed = {key: value for key, value in asdict(settings).items() if value != default[key]}
        arguments = ", ".join(f"{key}={value!r}" for key, value in changed.items())
        lines.append(f"    {batch}: LaunchSettings({arguments}),")
    return "SETTINGS_BY_BATCH = {\n" + "\n".join(lines) + "\n}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--contexts", default="512,1024")
    parser.add_argument("--out", type=Path, default=Path("decode_attention_sweep.json"))
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows, tuned = sweep([int(b) for b in args.batch_sizes.split(",")], [int(c) for c in args.contexts.split(",")],
                        bandwidth)
    print(table_literal(tuned))
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, rows=rows,
                                        tuned={b: asdict(s) for b, s in tuned.items()}), indent=1))


if __name__ == "__main__":
    main()
