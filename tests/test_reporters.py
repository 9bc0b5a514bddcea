"""`[log] report_to`: TensorBoard, W&B (offline) and MLflow (a file store) get exactly what metrics.jsonl gets, the
resolved config and the plan's summary; a resumed run continues the same tracker runs; no tracker package is
imported unless named; a named tracker that is not installed stops the run before any weights load (exit 2).

What each tracker wrote is read back from its own files (tests/tracker_readers.py) and compared with metrics.jsonl
value for value (TensorBoard stores scalars as float32, so its values are compared with the float32 of the JSON's).
The tiny pipeline on CPU, 3 steps: the first attempt is killed (KeyboardInterrupt) after step 2's records are written
and before its checkpoint, then resumed from step 1's checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest

from tracker_readers import MLFLOW_STATUS, mlflow_runs, tensorboard_scalars, tensorboard_texts, wandb_run

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
TRACKERS = ("wandb", "mlflow", "tensorboard")
INSTALLED = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
SETTINGS = ["pipeline.device=cpu", "log.progress=false", "pipeline.num_steps=3", "checkpoint.every_n_steps=1",
            "data.prompts_per_step=2", "rollout.max_new_tokens=6", "eval.every_n_steps=2", "eval.num_prompts=1",
            "eval.max_new_tokens=3"]


def _settings(run_dir: Path, trackers) -> list[str]:
    return [*SETTINGS, f"pipeline.output_dir={run_dir}", f"log.report_to={json.dumps(list(trackers))}"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _numbers(record: dict) -> dict:
    """A record as the trackers get it (README, [log] report_to): numeric fields, `<kind>/<field>`, `/` -> `.`."""
    return {f"{record['kind']}/{key.replace('/', '.')}": value for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _by_step(records: list[dict]) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for record in records:
        rows.setdefault(record["step"], {}).update(_numbers(record))
    return rows


def _by_key(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in _numbers(record).items():
            series.setdefault(key, []).append((record["step"], value))
    return series


def _need(name: str) -> None:
    if name not in INSTALLED:
        pytest.skip(f"{name} is not installed (pip install \"opdgraph[{name}]\")")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Run with every installed tracker, killed at step 2's checkpoint, resumed to the end. Returns the run
    directory, the MLflow store, and what the first attempt left (its metrics.jsonl, reporters.json, MLflow runs)."""
    if not INSTALLED:
        pytest.skip("no tracker package installed")
    from opdgraph.cli import main
    from opdgraph.runtime import run as run_module

    root = tmp_path_factory.mktemp("trackers")
    run_dir, store = root / "run", root / "mlruns"
    arguments = ["run", str(TINY), *(w for s in _settings(run_dir, INSTALLED) for w in ("--set", s))]
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(name, raising=False)  # the defaults: run_dir/wandb, project and experiment "opdgraph"
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(root / name.lower()))
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        original = run_module.save_run_checkpoint

        def killed_at_step_2(ctx, **kwargs):
            if ctx.step == 2:
                raise KeyboardInterrupt("simulated kill")
            return original(ctx, **kwargs)

        patch.setattr(run_module, "save_run_checkpoint", killed_at_step_2)
        assert main(arguments) == 130  # the CLI's exit for an interrupt (128 + SIGINT)
        first = {"records": _records(run_dir / "metrics.jsonl"), "state": json.loads((run_dir / "reporters.json")
                                                                                     .read_text()),
                 "mlflow": mlflow_runs(store) if "mlflow" in INSTALLED else {}}
        patch.setattr(run_module, "save_run_checkpoint", original)
        assert main([*arguments, "--resume", str(run_dir)]) == 0
    return run_dir, store, first


def test_first_attempt_is_the_case_under_test(resumed):
    """The kill must leave step 2 reported and no step-2 checkpoint, so the resume trains step 2 again."""
    run_dir, _, first = resumed
    assert [r["step"] for r in first["records"] if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in _records(run_dir / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]


def test_tensorboard_has_metrics_jsonl_exactly(resumed):
    """Every numeric field of every record, under the same name and step, once (the resume cut the event files back
    to the checkpoint): fails if a field or step is lost, repeated or renamed."""
    import numpy as np

    _need("tensorboard")
    run_dir, _, _ = resumed
    expected = {key: [(step, float(np.float32(value))) for step, value in points]
                for key, points in _by_key(_records(run_dir / "metrics.jsonl")).items()}
    got = {key: sorted(points) for key, points in tensorboard_scalars(run_dir / "tensorboard").items()}
    assert got == expected


def test_mlflow_has_metrics_jsonl_exactly_in_one_continued_run(resumed):
    """One MLflow run for both attempts (the resume continued it: KILLED after the first, FINISHED after the second);
    each metric has one point per step: the first attempt's up to step 2 (already held, so not sent again), the
    resumed run's after. Fails if the resume opens a second run, repeats a step, or a value differs in any bit."""
    _need("mlflow")
    run_dir, store, first = resumed
    (run_id, before), = first["mlflow"].items()
    assert before["status"] == MLFLOW_STATUS["KILLED"]
    runs = mlflow_runs(store)
    assert list(runs) == [run_id]
    assert runs[run_id]["status"] == MLFLOW_STATUS["FINISHED"]
    final = _records(run_dir / "metrics.jsonl")
    expected = _by_key([*first["records"], *(r for r in final if r["step"] > 2)])
    assert runs[run_id]["metrics"] == {key: [(s, float(v)) for s, v in points] for key, points in expected.items()}


def test_wandb_offline_runs_share_one_id_and_hold_metrics_jsonl(resumed):
    """Both attempts write to W&B run id of reporters.json (an offline-run folder each, in run_dir/wandb: `wandb
    sync` joins them); the first holds the first attempt's records exactly, the second the resumed steps."""
    _need("wandb")
    run_dir, _, first = resumed
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    attempts = [wandb_run(folder) for folder in folders]
    run_id = first["state"]["wandb"]["run_id"]
    assert [attempt["id"] for attempt in attempts] == [run_id, run_id]
    assert json.loads((run_dir / "reporters.json").read_text())["wandb"]["run_id"] == run_id
    assert attempts[0]["history"] == _by_step(first["records"])
    final = _records(run_dir / "metrics.jsonl")
    assert attempts[1]["history"] == _by_step([r for r in final if r["step"] >= 2])


def _without_unset(values):
    """config.toml leaves unset values out (as comments) and a stage's kind when it is the table's name."""
    if isinstance(values, dict):
        return {key: _without_unset(value) for key, value in values.items() if value is not None}
    return values


def _expected_config(run_dir: Path) -> dict:
    written = tomllib.loads((run_dir / "config.toml").read_text())  # opdgraph's resolved config, as the run records it
    for name, table in written.items():
        if name not in ("pipeline", "models", "data"):
            table.setdefault("kind", name)
    return written


def _expected_plan(run_dir: Path) -> dict:
    plan = json.loads((run_dir / "plan.json").read_text())
    return {"peak_gib": round(plan["peak_bytes"] / 2**30, 4), "peak_step": plan["peak"]["step"],
            "budget_gib": round(plan["budget_bytes"] / 2**30, 4), "within_budget": not plan["over_budget"],
            "steps": {step["name"]: step["repeats"] for step in plan["steps"]}}


def _plan_part(summary: dict) -> dict:
    picked = {key: summary[key] for key in ("peak_gib", "peak_step", "budget_gib", "within_budget")}
    return {**picked, "steps": {name: step["runs"] for name, step in summary["steps"].items()}}


def test_config_and_plan_summary_are_logged(resumed):
    """W&B's config, MLflow's params and artifacts and TensorBoard's text entries carry the resolved config (as
    config.toml records it) and the plan's summary (as plan.json has it): fails if either is missing or stale."""
    run_dir, store, _ = resumed
    config, plan = _expected_config(run_dir), _expected_plan(run_dir)
    if "wandb" in INSTALLED:
        logged = wandb_run(sorted((run_dir / "wandb").glob("offline-run-*"))[0])["config"]
        assert _without_unset(logged["config"]) == config
        assert _plan_part(logged["plan"]) == plan
    if "mlflow" in INSTALLED:
        (run,) = mlflow_runs(store).values()
        assert run["params"]["config.step.lr"] == "0.005" and run["params"]["config.pipeline.num_steps"] == "3"
        assert run["params"]["config.log.report_to"] == json.dumps(INSTALLED)
        assert run["params"]["plan.peak_step"] == plan["peak_step"]
        assert _without_unset(json.loads(run["artifacts"]["config.json"].read_text())) == config
        assert _plan_part(json.loads(run["artifacts"]["plan_summary.json"].read_text())) == plan
        for name in ("config.toml", "plan.txt"):  # the resume's config.toml lists what it changed
            assert run["artifacts"][name].read_text() == (run_dir / name).read_text()
    if "tensorboard" in INSTALLED:
        texts = tensorboard_texts(run_dir / "tensorboard")
        assert _without_unset(json.loads(texts["config/text_summary"].strip("`\n"))) == config
        assert _plan_part(json.loads(texts["plan/text_summary"].strip("`\n"))) == plan


NO_TRACKER_IMPORTED = """
import sys
from opdgraph.cli import main
code = main(sys.argv[1:])
print("imported:", sorted(name for name in ("wandb", "mlflow", "tensorboard") if name in sys.modules))
sys.exit(code)
"""


def test_a_run_without_report_to_imports_no_tracker(tmp_path):
    """Importing opdgraph and running a pipeline that names no tracker must not import wandb, mlflow or tensorboard
    (each costs seconds and may be absent)."""
    settings = [*SETTINGS, "pipeline.num_steps=1", f"pipeline.output_dir={tmp_path / 'run'}"]
    command = [sys.executable, "-c", NO_TRACKER_IMPORTED, "run", str(TINY), *(w for s in settings for w in ("--set", s))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: []" in done.stdout


@pytest.mark.parametrize("name", TRACKERS)
@pytest.mark.parametrize("check_only", [False, True])
def test_named_tracker_not_installed_stops_before_weights(tmp_path, monkeypatch, capsys, name, check_only):
    """`run` and `run --check` with a tracker whose package is missing must exit 2 before any weights load, naming
    the extra to install and where report_to was set, and leave no run directory behind."""
    from opdgraph.cli import main
    from opdgraph.runtime import build as build_module

    monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like to importlib
    monkeypatch.setattr(build_module, "load_models", lambda *a, **k: pytest.fail("weights loaded before the check"))
    run_dir = tmp_path / "run"
    settings = _settings(run_dir, [name])
    if check_only:  # named in the file this time: the error gives its line
        pipeline = tmp_path / "tiny.toml"
        shutil.copytree(TINY.parent / "data", tmp_path / "data")
        pipeline.write_text(TINY.read_text().replace("[log]\n", f"[log]\nreport_to = [\"{name}\"]\n"))
        line = pipeline.read_text().splitlines().index(f'report_to = ["{name}"]') + 1
        settings, where = settings[:-1], f"tiny.toml:{line}  log.report_to"
    else:
        pipeline, where = TINY, "--set log.report_to"
    arguments = ["run", str(pipeline), *(w for s in settings for w in ("--set", s))]
    assert main([*arguments, *(["--check"] if check_only else [])]) == 2
    message = capsys.readouterr().err
    assert f"{where}: names {name!r}, but the {name} package is not installed" in message
    assert f'pip install "opdgraph[{name}]"' in message
    assert not run_dir.exists()


@pytest.mark.parametrize("uri, words", [
    (None, "a database store, which needs the full MLflow package: pip install mlflow"),
    ("file:{tmp}/mlruns", "only opens with MLFLOW_ALLOW_FILE_STORE=true")])
def test_mlflow_store_that_cannot_open_stops_before_weights(tmp_path, monkeypatch, capsys, uri, words):
    """MLflow's default store (sqlite) with only the client installed, or its file store without MLflow 3's
    opt-in, must stop `run --check` (and so `run`) at startup with what to do, not fail after the weights load."""
    _need("mlflow")
    import mlflow.environment_variables

    from opdgraph.cli import main

    if uri is not None and not hasattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow opens its file store without an opt-in")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    settings = _settings(tmp_path / "run", ["mlflow"])
    assert main(["run", str(TINY), *(w for s in settings for w in ("--set", s)), "--check"]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class _FakeTracker:
    name = "wandb"
    calls: list = []

    def start(self, run_dir, config, plan_summary, previous):
        self.calls.append(("start", previous))
        return {"run_id": "fake"}

    def log(self, step, metrics):
        self.calls.append(("log", step, metrics))

    def finish(self, status):
        self.calls.append(("finish", status))


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (None, "KILLED"), (KeyboardInterrupt(), "KILLED"),
                                           (ValueError("bad row"), "FAILED")])
def test_what_a_tracker_receives(monkeypatch, tmp_path, error, status):
    """A skipped step's record: its null loss, its reason (a string) and a bool are not numbers and are not sent;
    a `/` inside a field becomes `.`; the status says how the run ended (KILLED: stopped before num_steps)."""
    import types

    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.runtime import reporters as reporters_module

    monkeypatch.setitem(sys.modules, "fake_tracker", types.SimpleNamespace(Reporter=_FakeTracker))
    monkeypatch.setitem(reporters_module.MODULES, "wandb", "fake_tracker")
    monkeypatch.setattr(_FakeTracker, "calls", [])
    cfg = load_pipeline(TINY, _settings(tmp_path, ["wandb"]))
    reporters = reporters_module.Reporters(["wandb"], cfg=cfg, plan=compile_plan(cfg), run_dir=tmp_path)
    last_step = 3 if status != "KILLED" or error is not None else 2
    reporters.log({"kind": "train", "step": last_step, "loss": None, "skipped": "non-finite gradient norm",
                   "grad_norm": 1.5, "seconds/rollout.decode": 0.25, "flag": True, "response_tokens": 12})
    with pytest.raises(type(error)) if error is not None else contextlib.nullcontext():
        with reporters:
            if error is not None:
                raise error
    assert _FakeTracker.calls == [
        ("start", None),
        ("log", last_step, {"train/step": last_step, "train/grad_norm": 1.5, "train/seconds.rollout.decode": 0.25,
                            "train/response_tokens": 12}),
        ("finish", status)]
    assert json.loads((tmp_path / "reporters.json").read_text()) == {"wandb": {"run_id": "fake"}}


def test_ranks_other_than_0_report_nothing(monkeypatch, tmp_path):
    """Under torchrun rank 0 alone reports (as it alone writes the run directory): another rank's trackers are
    none, whatever report_to names."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.runtime import distributed
    from opdgraph.runtime.reporters import open_reporters

    cfg = load_pipeline(TINY, _settings(tmp_path, TRACKERS))
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    reporters = open_reporters(cfg, compile_plan(cfg), tmp_path, resumed=False)
    reporters.log({"kind": "train", "step": 1, "loss": 1.0})
    assert reporters.names == [] and reporters.started == [] and list(tmp_path.iterdir()) == []


def test_removed_tensorboard_key_says_what_replaced_it(tmp_path):
    """An old pipeline's `[log] tensorboard = ...` must be a config error pointing at report_to, not an unknown key
    nor a silently ignored one."""
    from opdgraph.config import ConfigError, load_pipeline

    pipeline = tmp_path / "tiny.toml"
    shutil.copytree(TINY.parent / "data", tmp_path / "data")
    pipeline.write_text(TINY.read_text().replace("[log]\n", "[log]\ntensorboard = true\n"))
    with pytest.raises(ConfigError) as error:
        load_pipeline(pipeline)
    line = pipeline.read_text().splitlines().index("tensorboard = true") + 1
    assert f"tiny.toml:{line}  log.tensorboard: removed" in str(error.value)
    assert 'report_to = ["tensorboard"]' in str(error.value)
