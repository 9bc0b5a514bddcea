"""Experiment trackers (`[log] report_to`): TensorBoard, Weights & Biases and MLflow get what metrics.jsonl gets.

Rank 0 sends, to each tracker named in `report_to`, every record metrics.jsonl gets, plus the resolved config and
the plan's summary (opdgraph.runtime.run_summary) once per run. Each numeric field of a record is one number at the
record's step, named `<kind>/<field>` with any `/` inside the field written `.` (`train/loss`, `eval/reverse_kl`,
`train/seconds.rollout.decode` for `seconds/rollout.decode`: MLflow's file store keeps a name as a path, where
`train/seconds` could not also be a folder); the same names in every tracker. Bools, strings and the nulls that stand
for non-finite values are left out: they are not numbers. One small class per tracker, behind one interface:

    start(run_dir, config, plan_summary, previous) -> dict   open the tracker's run (continue it when `previous`,
                                                              what it returned to the attempt being resumed, is
                                                              given); returns what identifies that run
    log(step, metrics)                                       one record's numbers
    finish(status)                                           "FINISHED", "KILLED" (stopped before num_steps: a
                                                              signal, Ctrl-C) or "FAILED" (an error)

Each tracker lives in its own module (reporter_tensorboard, reporter_wandb, reporter_mlflow) that imports its
package; a module is imported only when its tracker is named, so a run that names none imports none of them.

When: the trackers start at the run's first record (after every startup check and the run directory's first writes:
a run refused at startup creates no tracker run), and finish when the run ends, however it ends.

Resume: `reporters.json` in the run directory keeps each tracker's run (W&B: id, project, entity; MLflow: run id,
tracking URI), written as soon as it has started; `--resume` continues those runs instead of opening new ones (a
tracker named for the first time on a resume starts a new run). The steps after the resumed checkpoint are trained
again; each tracker keeps every step once: TensorBoard's event files are cut back to the checkpoint like
metrics.jsonl (opdgraph.runtime.run_logs), and W&B and MLflow skip the steps they already hold (see their modules).

`check_reporters(cfg)` runs with the startup checks, before any weights load: a named tracker whose package is not
installed is a ReporterError (exit 2) naming the extra that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

from opdgraph.errors import ReporterError
from opdgraph.runtime.durable import replace_text
from opdgraph.stages import named_settings

STATE_FILE = "reporters.json"
# report_to name -> the module of its reporter; the package it needs and the extra that installs it share its name
MODULES = {"tensorboard": "opdgraph.runtime.reporter_tensorboard", "wandb": "opdgraph.runtime.reporter_wandb",
           "mlflow": "opdgraph.runtime.reporter_mlflow"}


def _report_to(cfg) -> tuple[str, tuple[str, ...]]:
    """(the stage that publishes report_to, the trackers it names): the log's (stages/log.py), found by name."""
    return named_settings(cfg.stages, "run_settings").get("report_to", ("", ()))


def _named(cfg) -> list[str]:
    return list(_report_to(cfg)[1])


def check_reporters(cfg) -> None:
    """Each named tracker's package is installed (and its module's own `check`, where it has one, passes)."""
    log, _ = _report_to(cfg)
    for name in _named(cfg):
        path, source = f"{log}.report_to", cfg.provenance.get(f"{log}.report_to", "default")
        where = f"--set {path}" if source == "--set" else f"{source}  {path}"  # like a config problem's location
        if importlib.util.find_spec(name) is None:
            raise ReporterError(f"{where}: names {name!r}, but the {name} package is not installed: "
                                f"pip install \"opdgraph[{name}]\" (or drop {name!r} from report_to)")
        check = getattr(importlib.import_module(MODULES[name]), "check", None)
        if check is not None:
            check(where)


def read_state(run_dir: Path) -> dict[str, dict]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _numbers(record: dict[str, Any]) -> dict[str, float | int]:
    kind = record.get("kind", "train")
    return {f"{kind}/{key.replace('/', '.')}": value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class Reporters:
    """The trackers of one run (none on ranks other than 0, or when report_to is empty). A context manager: leaving
    it finishes every started tracker with the status the way out implies."""

    def __init__(self, names: list[str], *, cfg=None, plan=None, run_dir: Path | None = None, resumed: bool = False):
        self.names = names
        self.cfg, self.plan, self.run_dir, self.resumed = cfg, plan, run_dir, resumed
        self.started: list[Any] = []
        self.last_train_step = 0
        self.closed = False

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics.jsonl record (as written: non-finite values already null) to every tracker."""
        if not self.names:
            return
        if not self.started:
            self._start()
        step, numbers = int(record.get("step", 0)), _numbers(record)
        for reporter in self.started:
            reporter.log(step, numbers)
        if record.get("kind", "train") == "train":
            self.last_train_step = step

    def _start(self) -> None:
        from opdgraph.runtime.run_summary import plan_summary, resolved_config

        config, summary = resolved_config(self.cfg), plan_summary(self.plan)
        state = read_state(self.run_dir) if self.resumed else {}
        for name in self.names:
            reporter = importlib.import_module(MODULES[name]).Reporter()
            state[name] = reporter.start(self.run_dir, config, summary, state.get(name) if self.resumed else None)
            self.started.append(reporter)
            replace_text(self.run_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")

    def close(self, error: BaseException | None = None) -> None:
        """Finish every started tracker (once). After an error, a tracker that cannot finish is reported on stderr
        and the run's own error goes on; on a normal end its error is raised."""
        if self.closed or not self.started:
            return
        self.closed = True
        if error is not None:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        else:
            status = "FINISHED" if self.last_train_step >= self.cfg.pipeline.num_steps else "KILLED"
        for reporter in self.started:
            try:
                reporter.finish(status)
            except Exception as problem:
                if error is None:
                    raise
                print(f"report_to: could not finish the {reporter.name} run: {problem}", file=sys.stderr)

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(error)


def open_reporters(cfg, plan, run_dir: Path, *, resumed: bool) -> Reporters:
    """The trackers `report_to` names, for rank 0; an empty set elsewhere (rank 0 alone reports, as it alone writes
    the run directory)."""
    from opdgraph.runtime import distributed

    names = _named(cfg) if distributed.is_main() else []
    return Reporters(names, cfg=cfg, plan=plan, run_dir=Path(run_dir), resumed=resumed)
