"""The Weights & Biases tracker of `[log] report_to` (`pip install "opdgraph[wandb]"`).

W&B's own settings apply as usual (WANDB_MODE=offline logs locally, WANDB_API_KEY, WANDB_ENTITY, ...). The run goes
to project WANDB_PROJECT (default "opdgraph"), is named after the run directory, and keeps its files in
output_dir/wandb unless WANDB_DIR says otherwise. Its config is {"config": the resolved config, "plan": the plan's
summary}. Each record is one `log` call at the record's step (W&B's own step axis is opdgraph's step).

Resume: the run is continued by its id (`resume="allow"`, in the project and entity it was started in). W&B steps
only go forward, so the steps a stopped attempt had already sent (those after the checkpoint, trained again) are
skipped rather than sent for W&B to drop: W&B keeps its first copy of them. Offline, each attempt writes its own
offline-run folder under the same run id; `wandb sync` uploads them in order into one run.
"""

from __future__ import annotations

import os
from pathlib import Path

import wandb

from opdgraph.errors import ReporterError


class Reporter:
    name = "wandb"

    def start(self, run_dir: Path, config: dict, plan_summary: dict, previous: dict | None) -> dict:
        run_dir = Path(run_dir)
        project = os.environ.get("WANDB_PROJECT") or "opdgraph"
        if previous is not None and previous["project"] != project:
            print(f"report_to wandb: continuing run {previous['run_id']} in project {previous['project']}, where "
                  f"this run started (WANDB_PROJECT now says {project})")
        try:
            self.run = wandb.init(
                project=previous["project"] if previous else project,
                entity=previous["entity"] if previous else os.environ.get("WANDB_ENTITY"),
                id=previous["run_id"] if previous else None, resume="allow" if previous else None,
                name=run_dir.name, dir=None if os.environ.get("WANDB_DIR") else str(run_dir))
            self.run.config.update({"config": config, "plan": plan_summary}, allow_val_change=True)
        except wandb.errors.Error as error:
            raise ReporterError(f"report_to wandb: W&B could not start its run: {error} (WANDB_MODE=offline logs "
                                "without an account; `wandb sync` uploads later)") from error
        # The next step W&B takes; a resumed online run's steps up to here are already there (offline: 0).
        self.next_step = self.run.step if previous else 0
        return {"run_id": self.run.id, "project": self.run.project, "entity": self.run.entity}

    def log(self, step: int, metrics: dict) -> None:
        if step >= self.next_step:
            self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
