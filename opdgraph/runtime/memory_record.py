"""`opdgraph run --record-memory`: measured device memory per plan step against the plan's prediction.

For every plan step the executor resets the allocator's peak counter before the step and reads
`torch.cuda.max_memory_allocated` after it; the largest value over all runs of the step (micro-batches, training
steps) is its measured peak. `memory.json` and `memory.txt` in the run directory hold, per step: predicted live
bytes, measured peak, and their ratio; the target is every step within 10% and never under-predicted by more than
5%. PyTorch memory snapshots (open them at https://pytorch.org/memory_viz) are written as `memory_snapshot.pickle`.
On CPU nothing is measured (the allocator has no such counters) and the table says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GIB = 2**30


class MemoryRecorder:
    def __init__(self, plan, device: torch.device, run_dir: Path):
        self.plan = plan
        self.device = device
        self.run_dir = Path(run_dir)
        self.enabled = device.type == "cuda"
        self.measured: dict[str, int] = {}
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def before(self, step) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def after(self, step) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.measured[step.name] = max(self.measured.get(step.name, 0), peak)

    def rows(self) -> list[dict]:
        rows = []
        for step in self.plan.steps:
            measured = self.measured.get(step.name)
            row = {"step": step.name, "predicted_gib": step.live_bytes / GIB,
                   "measured_gib": None if measured is None else measured / GIB}
            if measured:
                row["predicted_over_measured"] = step.live_bytes / measured
            rows.append(row)
        return rows

    def write(self) -> str:
        rows = self.rows()
        (self.run_dir / "memory.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
        lines = [f"{'plan step':<28}{'predicted GiB':>14}{'measured GiB':>14}{'pred/meas':>10}"]
        for row in rows:
            measured = "-" if row["measured_gib"] is None else f"{row['measured_gib']:.2f}"
            ratio = f"{row['predicted_over_measured']:.2f}" if "predicted_over_measured" in row else "-"
            lines.append(f"{row['step']:<28}{row['predicted_gib']:>14.2f}{measured:>14}{ratio:>10}")
        if not self.enabled:
            lines.append("(not measured: memory is recorded on CUDA devices only)")
        text = "\n".join(lines) + "\n"
        (self.run_dir / "memory.txt").write_text(text)
        if self.enabled:
            torch.cuda.memory._dump_snapshot(str(self.run_dir / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        return text
