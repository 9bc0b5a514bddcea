"""Benchmarks only: `opdgraph run` that reports its phases and each rank's peak memory (used by multi_gpu.py).

    python benchmarks/rank_worker.py REPORT_DIR [--fixed-lengths] run PIPELINE --set KEY=VALUE ...
    torchrun --standalone --nproc-per-node 2 benchmarks/rank_worker.py REPORT_DIR run PIPELINE ...

Everything after REPORT_DIR (and the optional flag) is the ordinary `opdgraph` command line. Each rank prints
`[rank r +Ns] phase` lines to stderr, flushed (the runtime silences stdout on ranks other than 0), so a run that
hangs shows where; and after every phase it rewrites REPORT_DIR/rank<r>.json: the plan's predicted per-rank peak,
then per training step its seconds and torch.cuda.max_memory_allocated (the runtime resets the peak counter at the
start of each step, so each number is that step's peak).
--fixed-lengths: no token ends a response early (the tokenizer's EOS ids are dropped), so every run decodes exactly
rollout.max_new_tokens per sequence and runs on different numbers of GPUs decode the same amount.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

STARTED = time.perf_counter()


class RankReport:
    def __init__(self, directory: Path):
        self.rank = int(os.environ.get("RANK", "0"))
        self.path = directory / f"rank{self.rank}.json"
        self.data = {"rank": self.rank, "phases": [], "steps": []}

    def phase(self, text: str) -> None:
        elapsed = time.perf_counter() - STARTED
        self.data["phases"].append([round(elapsed, 2), text])
        sys.stderr.write(f"[rank {self.rank} +{elapsed:.0f}s] {text}\n")
        sys.stderr.flush()
        self.path.write_text(json.dumps(self.data, indent=1))


def instrument(report: RankReport, fixed_lengths: bool) -> None:
    """Wrap the runtime's phases (process group, models, context, each training step) to report them."""
    from opdgraph.runtime import distributed
    from opdgraph.runtime import build as build_module
    from opdgraph.runtime import run as run_module
    from opdgraph.runtime.executor import PlanExecutor

    init_distributed = distributed.init_distributed
    load_models = build_module.load_models
    build_context = build_module.build_context
    run_training_step = PlanExecutor.run_training_step

    def init_distributed_reported(device_setting):
        report.phase("joining the process group")
        init_distributed(device_setting)
        report.phase(f"process group ready (world size {distributed.world_size()})")

    def load_models_reported(*args, **kwargs):
        report.phase("loading models (random init)")
        models = load_models(*args, **kwargs)
        if fixed_lengths:
            for _, tokenizer in models.values():
                tokenizer.eos_token_ids = []
        report.phase("models loaded")
        return models

    def build_context_reported(cfg, plan, *args, **kwargs):
        report.data.update(predicted_peak_bytes=plan.peak_bytes, predicted_peak_step=plan.peak.step,
                           world_size=int(os.environ.get("WORLD_SIZE", "1")))
        ctx = build_context(cfg, plan, *args, **kwargs)
        report.phase("context built (engine, sharding, optimizer)")
        return ctx

    def run_training_step_reported(self):
        started = time.perf_counter()
        run_training_step(self)
        cuda = self.ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.ctx.device)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.ctx.device) if cuda else 0
        report.data["steps"].append({"seconds": seconds, "peak_bytes": peak})
        report.phase(f"training step {len(report.data['steps'])} done: {seconds:.2f} s, peak {peak / 2**30:.2f} GiB")

    distributed.init_distributed = init_distributed_reported
    build_module.load_models = load_models_reported
    run_module.build_context = build_context_reported
    PlanExecutor.run_training_step = run_training_step_reported


def main() -> int:
    directory = Path(sys.argv[1])
    rest = sys.argv[2:]
    fixed_lengths = bool(rest) and rest[0] == "--fixed-lengths"
    if fixed_lengths:
        rest = rest[1:]
    directory.mkdir(parents=True, exist_ok=True)
    report = RankReport(directory)
    report.phase("started; compiling the plan")
    instrument(report, fixed_lengths)
    from opdgraph.cli import main as opdgraph_main

    try:
        code = opdgraph_main(rest)
    except BaseException as error:
        report.data["error"] = f"{type(error).__name__}: {error}"
        report.phase(f"failed: {report.data['error']}")
        raise
    report.phase(f"finished (exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
