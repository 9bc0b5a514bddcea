"""The TensorBoard tracker of `[log] report_to`: event files in output_dir/tensorboard, written by torch's
SummaryWriter (which needs the `tensorboard` package: `pip install "opdgraph[tensorboard]"`).

Each number is a scalar under its `<kind>/<field>` tag at the record's step (TensorBoard stores scalars as float32).
The resolved config and the plan's summary are two text entries (`config`, `plan`) at step 0, written by a run's
first attempt; a resume keeps them, since its cut-back of the event files (opdgraph.runtime.run_logs) keeps
every event of the steps its checkpoint covers. Event files are flushed after every record and fsynced with the
other logs before each checkpoint (opdgraph.runtime.metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from opdgraph.runtime.run_logs import TENSORBOARD_DIR


def _code_block(value) -> str:
    """JSON as a markdown code block: TensorBoard's text plugin renders markdown."""
    return "```\n" + json.dumps(value, indent=1, sort_keys=True) + "\n```"


class Reporter:
    name = "tensorboard"

    def start(self, run_dir: Path, config: dict, plan_summary: dict, previous: dict | None) -> dict:
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        if previous is None:
            self.writer.add_text("config", _code_block(config), 0)
            self.writer.add_text("plan", _code_block(plan_summary), 0)
        return {}

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()
