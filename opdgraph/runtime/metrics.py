"""Run outputs a person watches: `metrics.jsonl`, TensorBoard events (when installed), samples, a progress line.

`metrics.jsonl` gets one JSON object per training step (and one per eval), appended and flushed at once, so a killed
run keeps every line it finished. Before a checkpoint is written the run calls `sync`, which fsyncs every log: a
checkpoint of step S exists only once every record of steps up to S is on disk. On resume every log is cut back to
the steps the checkpoint covers (opdgraph.runtime.run_logs), so a resumed run's logs equal an uninterrupted run's
(on the same device), except for the fields that measure this process: keys containing `seconds` or
`tokens_per_s` (wall-clock time) and `peak_memory_gib` (CUDA memory).

Nothing is written into the run directory before the first record (the TensorBoard writer, which creates its event
file when built, is built then): a run that fails while starting leaves no log behind.
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
    """Appends step records to metrics.jsonl and mirrors scalars to TensorBoard if it is importable."""

    def __init__(self, run_dir: Path, *, tensorboard: bool):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self._writer = None
        self._tensorboard = tensorboard

    def _tensorboard_writer(self):
        if self._tensorboard and self._writer is None:
            self._tensorboard = False
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
                return None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        return self._writer

    def write(self, record: dict[str, Any]) -> None:
        # NaN / inf are not JSON: a skipped step's loss is written as null so strict readers (jq, JS) still parse.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        if self._tensorboard_writer() is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))
            self._writer.flush()

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
        if self._writer is not None:
            self._writer.close()


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


def log_rollout_samples(ctx, *, count: int) -> None:
    """Append a few of this step's rollout samples (decoded) to samples.jsonl."""
    samples = ctx.last_samples[:count]
    decode = ctx.tokenizer.decode
    ctx.metrics.write_samples(ctx.step, [{"label": "rollout", "prompt": decode(s.prompt_ids),
                                          "student": decode(s.response_ids), "finish_reason": s.finish_reason}
                                         for s in samples])
