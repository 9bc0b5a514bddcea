"""Run outputs a person watches: `metrics.jsonl`, samples, a progress line; the trackers of `[log] report_to`.

`metrics.jsonl` gets one JSON object per training step (and one per eval), appended and flushed at once, so a killed
run keeps every line it finished. Before a checkpoint is written the run calls `sync`, which fsyncs every log: a
checkpoint of step S exists only once every record of steps up to S is on disk. On resume every log is cut back to
the steps the checkpoint covers (opdgraph.runtime.run_logs), so a resumed run's logs equal an uninterrupted run's
(on the same device), except for the fields that measure this process: keys containing `seconds` or
`tokens_per_s` (wall-clock time) and `peak_memory_gib` (CUDA memory).

Every record also goes to the trackers `report_to` names (opdgraph.runtime.reporters: TensorBoard, W&B, MLflow),
right after its line is written. Nothing is written into the run directory before the first record (the trackers
start then, and TensorBoard's writer creates its event file when built): a run that fails while starting leaves no
log behind.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from opdgraph.runtime.durable import fsync_dir, fsync_file


class MetricsLog:
    """Appends step records to metrics.jsonl and sends each to the run's trackers (`reporters`, when given)."""

    def __init__(self, run_dir: Path, *, reporters=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.reporters = reporters

    def write(self, record: dict[str, Any]) -> None:
        # NaN / inf are not JSON: a skipped step's loss is written as null so strict readers (jq, JS) still parse.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        if self.reporters is not None:
            self.reporters.log(record)

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        with open(self.samples_path, "a") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, **sample}, sort_keys=True) + "\n")

    def sync(self) -> None:
        """Make every record written so far durable (files and their folders)."""
        logs = [self.path, self.samples_path, *sorted((self.run_dir / "tensorboard").glob("events.out.tfevents.*"))]
        for path in logs:
            if path.is_file():
                fsync_file(path)
        for folder in {path.parent for path in logs if path.exists()}:
            fsync_dir(folder)

    def close(self) -> None:
        """The trackers are finished by the run (opdgraph.runtime.reporters.Reporters), whichever way it ends."""


class ProgressLine:
    """A one-line progress bar on stderr with live metrics; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, *, enabled: bool, first_step: int = 0, stream: TextIO | None = None):
        self.total = total
        self.first_step = first_step  # steps done before this process started (resume): not part of its speed
        self.enabled = enabled
        self.stream = stream or sys.stderr  # looked up now: a default bound at import would outlive a redirect
        self.start = time.perf_counter()
        self.interactive = self.stream.isatty()

    def update(self, done: int, fields: dict[str, float]) -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done - self.first_step, 1) * (self.total - done)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}  {elapsed:.0f}s (eta {eta:.0f}s)  {shown}"
        if self.interactive:
            self.stream.write("\r" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def log_rollout_samples(run, tokenizer, *, count: int) -> None:
    """Append a few of this step's rollout samples (decoded) to samples.jsonl (`run`: a stage's RunServices)."""
    samples = run.last_samples[:count]
    decode = tokenizer.decode
    run.metrics.write_samples(run.step, [{"label": "rollout", "prompt": decode(s.prompt_ids),
                                          "student": decode(s.response_ids), "finish_reason": s.finish_reason}
                                         for s in samples])
