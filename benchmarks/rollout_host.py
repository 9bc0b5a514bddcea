"""Host-side cost of one rollout decode step, on the CPU (no model, no GPU): where the python time of a step goes.

Drives the real scheduler through prefill and then steady decode of ``batch_size`` single-sample requests (prompt
256, page 16, like benchmarks/rollout_gpu.py), feeding fake tokens, and times each host phase of a decode step:

- schedule: ``Scheduler.schedule()``;
- build: what the GPU graph path builds each step: new = ``DecodeStaging.stage`` (numpy, staged graph inputs and
  flashinfer plan arrays), old = ``build_model_inputs`` + ``plan_arrays`` (python lists, many small tensors);
- update: ``Scheduler.update()`` with the sampled tokens.

flashinfer's own ``plan()``, the graph replay launch and the sync are GPU-side costs and are measured by
``benchmarks/rollout_gpu.py --profile``. Not a test: prints a table.

    python benchmarks/rollout_host.py [--steps 200] [--batch-sizes 64,128,256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from opdgraph.kernels.flashinfer_attention import plan_arrays
from opdgraph.rollout.batch_builder import build_model_inputs
from opdgraph.rollout.cuda_graphs import batch_lists
from opdgraph.rollout.decode_staging import DecodeStaging
from opdgraph.rollout.kv_pool import PagePool
from opdgraph.rollout.request import Request, SamplingParams
from opdgraph.rollout.scheduler import Scheduler
from opdgraph.rollout.sequence import Sequence

PAGE_SIZE = 16


def run(batch_size: int, steps: int, prompt_tokens: int = 256) -> dict[str, float]:
    """Median microseconds per decode step of each host phase (medians: this machine may be shared)."""
    pages_per_seq = -(-(prompt_tokens + steps + 8) // PAGE_SIZE)
    pool = PagePool(batch_size * pages_per_seq)
    scheduler = Scheduler(pool, page_size=PAGE_SIZE, max_num_seqs=batch_size, prefill_token_budget=8192)
    params = SamplingParams(max_new_tokens=steps + 8, eos_token_ids=())
    for i in range(batch_size):
        scheduler.add(Sequence(Request(f"r{i}", [i % 100 + 1] * prompt_tokens, params, seed=i), [0], i))
    staging = DecodeStaging(batch_size, PAGE_SIZE, scratch_page=pool.num_pages, pin=False)
    samples = dict(schedule=[], build_old=[], build_new=[], update=[])
    timed = 0
    while timed < steps:
        started = time.perf_counter()
        batch = scheduler.schedule()
        scheduled = time.perf_counter()
        decode = all(chunk.is_decode for chunk in batch.chunks)
        if decode:
            build_model_inputs(batch, PAGE_SIZE, torch.device("cpu"))
            plan_arrays(*batch_lists(batch), PAGE_SIZE)
            built_old = time.perf_counter()
            staging.stage(batch, batch_size)
            built_new = time.perf_counter()
        num_rows = len(batch.sampling_chunks)
        tokens, logprobs = [7] * num_rows, [-1.0] * num_rows
        before_update = time.perf_counter()
        scheduler.update(batch, tokens, logprobs)
        if decode:
            samples["schedule"].append(scheduled - started)
            samples["build_old"].append(built_old - scheduled)
            samples["build_new"].append(built_new - built_old)
            samples["update"].append(time.perf_counter() - before_update)
            timed += 1
    return {name: 1e6 * statistics.median(values) for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-sizes", default="64,128,256")
    args = parser.parse_args()
    print(f"{'bs':>4} {'schedule us':>12} {'build old us':>13} {'build new us':>13} {'update us':>10} "
          f"{'total old':>10} {'total new':>10}")
    for batch_size in (int(size) for size in args.batch_sizes.split(",")):
        t = run(batch_size, args.steps)
        old = t["schedule"] + t["build_old"] + t["update"]
        new = t["schedule"] + t["build_new"] + t["update"]
        print(f"{batch_size:>4} {t['schedule']:>12.0f} {t['build_old']:>13.0f} {t['build_new']:>13.0f} "
              f"{t['update']:>10.0f} {old:>10.0f} {new:>10.0f}")


if __name__ == "__main__":
    main()
