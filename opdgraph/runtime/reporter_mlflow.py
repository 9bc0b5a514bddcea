"""The MLflow tracker of `[log] report_to` (`pip install "opdgraph[mlflow]"`: mlflow-skinny, the client).

The tracking URI is MLflow's own (MLFLOW_TRACKING_URI, else MLflow's default, a local sqlite database that needs the
full `mlflow` package); the experiment is MLFLOW_EXPERIMENT_NAME (default "opdgraph"), created when missing; the run
is named after the run directory and tagged with its path. Logged with the run: the resolved config and the plan's
summary as params (flat dotted keys: `config.step.lr`, `plan.peak_gib`) and as the artifacts config.json and
plan_summary.json, with the run directory's config.toml and plan.txt. Each record is one log_batch at its step.

MLflow limits what a param can be (a key of letters, digits and `_ - . / space`; a value of at most 6000
characters); a config value beyond them is left out of the params, said so once, and is in config.json.

Resume: the run is continued by its id at the tracking URI it was started on (reporters.json), its status set back
to RUNNING. Params are fixed once logged in MLflow, so only new keys are added; the resume's config.toml, re-uploaded,
lists what changed. A metric's points at steps the run already holds (a stopped attempt sent them before the resumed
checkpoint was reached again) are skipped, so each step has one point per metric.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from opdgraph.errors import ReporterError
from opdgraph.runtime.run_summary import flat

PARAM_KEY = re.compile(r"[\w\-. /]+")
MAX_PARAM_CHARACTERS = 6000
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def check(where: str) -> None:
    """The startup check: the tracking URI's store can be opened with what is installed (nothing is written)."""
    import importlib.util

    uri = mlflow.get_tracking_uri()
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
        raise ReporterError(f"{where}: MLflow's tracking URI is {uri} (MLFLOW_TRACKING_URI, or MLflow's default "
                            "when unset), a database store, which needs the full MLflow package: pip install mlflow; "
                            "or set MLFLOW_TRACKING_URI to your tracking server (http://host:5000)")
    if scheme in ("", "file"):
        try:  # MLflow 3 refuses its file store unless this is set; older versions have no such switch
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        except ImportError:
            return
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise ReporterError(f"{where}: MLflow's tracking URI is the file store {uri}, which this MLflow only "
                                "opens with MLFLOW_ALLOW_FILE_STORE=true; set that, or use a tracking server or "
                                "database (MLFLOW_TRACKING_URI)")


def _param_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Reporter:
    name = "mlflow"

    def start(self, run_dir: Path, config: dict, plan_summary: dict, previous: dict | None) -> dict:
        run_dir = Path(run_dir)
        uri = previous["tracking_uri"] if previous else mlflow.get_tracking_uri()
        if previous is not None and uri != mlflow.get_tracking_uri():
            print(f"report_to mlflow: continuing run {previous['run_id']} at {uri}, where this run started "
                  f"(MLFLOW_TRACKING_URI now says {mlflow.get_tracking_uri()})")
        self.client = MlflowClient(tracking_uri=uri)
        self.held: dict[str, int] | None = {} if previous else None  # key -> last step the run holds (resume)
        try:
            if previous:
                self.run_id = previous["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._create_run(run_dir)
            self._log_params(flat({"config": config, "plan": plan_summary}))
            self.client.log_dict(self.run_id, config, "config.json")
            self.client.log_dict(self.run_id, plan_summary, "plan_summary.json")
            for name in ("config.toml", "plan.txt"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
        except MlflowException as error:
            raise ReporterError(f"report_to mlflow: MLflow at {uri} could not start the run: {error.message}") from error
        return {"run_id": self.run_id, "tracking_uri": uri}

    def _create_run(self, run_dir: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "opdgraph"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"opdgraph.run_dir": str(run_dir.resolve())})
        return run.info.run_id

    def _log_params(self, values: dict) -> None:
        params = {key: _param_value(value) for key, value in values.items()}
        left_out = [key for key, value in params.items()
                    if not PARAM_KEY.fullmatch(key) or len(value) > MAX_PARAM_CHARACTERS]
        if left_out:
            print(f"report_to mlflow: not logged as params (MLflow limits keys and value lengths; see config.json): "
                  f"{', '.join(left_out)}")
        logged = self.client.get_run(self.run_id).data.params if self.held is not None else {}
        new = [Param(key, value) for key, value in params.items() if key not in left_out and key not in logged]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def _last_held_step(self, key: str) -> int:
        if key not in self.held:
            self.held[key] = max((point.step for point in self.client.get_metric_history(self.run_id, key)),
                                 default=-1)
        return self.held[key]

    def log(self, step: int, metrics: dict) -> None:
        now = int(time.time() * 1000)
        points = [Metric(key, float(value), now, step) for key, value in metrics.items()
                  if self.held is None or step > self._last_held_step(key)]
        if points:
            self.client.log_batch(self.run_id, metrics=points)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
