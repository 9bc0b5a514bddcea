"""The run-directory policy through `opdgraph run` (in process, tiny pipeline on CPU): which directory a run writes,
what a refused run leaves (nothing), resume checks against the checkpoint's config, --restart, the lock, run names,
and the error and exit-code paths of signals. Real kills and signals on real processes: test_run_kills.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from opdgraph.cli import main
from opdgraph.config import ConfigError, load_pipeline
from opdgraph.errors import RunDirectoryError
from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime import run_directory
from opdgraph.runtime.run_logs import truncate_jsonl
from opdgraph.runtime.signals import Interrupted, StopRequests, chosen_signal

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
SETTINGS = ["pipeline.device=cpu", "log.progress=false", "pipeline.num_steps=2",
            "checkpoint.every_n_steps=1", "checkpoint.keep_last=3", "eval.num_prompts=1", "eval.max_new_tokens=4",
            "rollout.max_new_tokens=8"]


def _copy_pipeline(target: Path) -> Path:
    (target / "data").mkdir(parents=True)
    for name in ("tiny_train.jsonl", "tiny_eval.jsonl"):
        shutil.copy(PIPELINES / "data" / name, target / "data" / name)
    shutil.copy(PIPELINES / "tiny.toml", target / "tiny.toml")
    return target / "tiny.toml"


def _run(pipeline: Path, *arguments: str, settings: list[str] = SETTINGS) -> int:
    return main(["run", str(pipeline), *(w for s in settings for w in ("--set", s)), *arguments])


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes: equal trees mean nothing was written."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(pipeline file, run directory) of a finished 2-step run with checkpoints 1 and 2; copy before changing."""
    root = tmp_path_factory.mktemp("safety")
    pipeline = _copy_pipeline(root / "pipeline")
    assert _run(pipeline, settings=[*SETTINGS, f"pipeline.output_dir={root / 'run'}"]) == 0
    return pipeline, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> tuple[Path, Path]:
    pipeline, run_dir = finished
    shutil.copytree(run_dir, tmp_path / "run")
    return pipeline, tmp_path / "run"


def _modified_data(pipeline: Path, target: Path) -> Path:
    copy = _copy_pipeline(target)
    train = copy.parent / "data" / "tiny_train.jsonl"
    train.write_text(train.read_text().replace("plus", "and", 1))
    return copy


REFUSED = {  # case -> (settings added, extra flags, words in the message); {run} is the run directory
    "changed lr": (["step.lr=0.001"], [], ["step.lr: 0.005 -> 0.001", "--allow-config-change"]),
    "changed divergence": (["loss.divergence=forward_kl"], [], ['loss.divergence: "reverse_kl" -> "forward_kl"']),
    "changed prompts_per_step": (["data.prompts_per_step=4"], [], ["data.prompts_per_step: 8 -> 4"]),
    "changed seed": (["pipeline.seed=1"], [], ["pipeline.seed: 0 -> 1"]),
    "two changes": (["pipeline.seed=1", "step.warmup_steps=0"], [], ["pipeline.seed", "step.warmup_steps: 2 -> 0"]),
    "conflicting output_dir": (["pipeline.output_dir={run}-other"], [], ["pipeline.output_dir", "{run}-other"]),
    "missing directory": ([], ["--resume", "{run}-nope"], ["does not exist"]),
    "a new run over it": ([], [], ["already holds a run", "--resume {run}"]),
    "restart with a checkpoint": ([], ["--restart"], ["intact checkpoint"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_runs_exit_2_and_write_nothing(run_copy, tmp_path, capsys, case):
    """Each refused start must exit 2 with a message that names the problem and what to do, and leave every
    directory as it was (no config.toml, plan, lock or new folder): fails if a refused run writes first."""
    pipeline, run_dir = run_copy
    added, flags, words = (tuple(str(x).replace("{run}", str(run_dir)) for x in part) for part in REFUSED[case])
    if "--resume" not in flags and "--restart" not in flags and case != "a new run over it":
        flags = ("--resume", str(run_dir))
    output = [] if any(s.startswith("pipeline.output_dir") for s in added) else [f"pipeline.output_dir={run_dir}"]
    before = _tree(tmp_path)
    assert _run(pipeline, *flags, settings=[*SETTINGS, *output, *added]) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in words), message
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_changed_data_file_is_refused(run_copy, tmp_path, capsys):
    """The same file name with other content changes the data: the resume must list the file's checksum."""
    _, run_dir = run_copy
    before = _tree(run_dir)
    changed = _modified_data(PIPELINES, tmp_path / "changed")
    assert _run(changed, "--resume", str(run_dir), settings=[*SETTINGS, f"pipeline.output_dir={run_dir}"]) == 2
    assert 'data.file_checksum["data/tiny_train.jsonl"]' in capsys.readouterr().err
    assert _tree(run_dir) == before


def test_cadence_changes_pass_and_every_change_is_appended_to_config_toml(run_copy, capsys):
    """Interval and display changes must not stop a resume; an accepted math change needs the flag; config.toml
    must keep the original and gain each resume's changes: fails if the history is overwritten or lost."""
    pipeline, run_dir = run_copy
    original = (run_dir / "config.toml").read_text()
    cadence = ["log.every_n_steps=2", "checkpoint.every_n_steps=2", "eval.every_n_steps=3", "log.progress=true"]
    base = [*SETTINGS, f"pipeline.output_dir={run_dir}"]
    assert _run(pipeline, "--resume", str(run_dir), settings=[*base, *cadence]) == 0
    assert _run(pipeline, "--resume", str(run_dir), "--allow-config-change", settings=[*base, "step.lr=0.001"]) == 0
    history = (run_dir / "config.toml").read_text()
    assert history.startswith(original)
    added = history[len(original):]
    for line in ("# changed (cadence): log.every_n_steps: 1 -> 2", "# changed (cadence): eval.every_n_steps: 10 -> 3",
                 "# changed (accepted by --allow-config-change): step.lr: 0.005 -> 0.001"):
        assert line in added, added
    assert added.count("# ---- resumed from") == 2
    assert "accepted by --allow-config-change" in capsys.readouterr().out


def test_resume_continues_the_directory_it_names(run_copy, tmp_path, monkeypatch, capsys):
    """`--resume DIR` must continue DIR, not the pipeline's default output directory (which overwrote another
    run): with no output_dir set, step 2 is redone into DIR and runs/tiny is never created. Resuming one older
    checkpoint (DIR/checkpoints/step-1) must set the newer one aside and give the same logs."""
    pipeline, run_dir = run_copy
    monkeypatch.chdir(tmp_path)
    expected = (run_dir / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(ckpt.checkpoint_dir(run_dir, 2))
    assert _run(pipeline, "--resume", str(run_dir)) == 0
    assert not (tmp_path / "runs").exists()
    assert _train_steps(run_dir) == [1, 2]
    assert _records(run_dir) == _records_of(expected)
    assert _run(pipeline, "--resume", str(ckpt.checkpoint_dir(run_dir, 1))) == 0
    assert "set-aside-step-000002" in capsys.readouterr().out
    assert _records(run_dir) == _records_of(expected) and ckpt.complete_steps(run_dir) == [1, 2]


def _records_of(lines: list[str]) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "tokens_per_s" not in k}
            for line in lines]


def _records(run_dir: Path) -> list[dict]:
    return _records_of((run_dir / "metrics.jsonl").read_text().splitlines())


def test_damaged_newest_checkpoint_falls_back_and_the_run_is_redone(run_copy, capsys):
    """Flipped bytes in the newest checkpoint's weights (same size): the resume must say so, continue from
    step 1, and redo step 2 exactly: fails if the damaged weights are loaded."""
    pipeline, run_dir = run_copy
    expected = _records(run_dir)
    weights = ckpt.checkpoint_dir(run_dir, 2) / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _run(pipeline, "--resume", str(run_dir), settings=[*SETTINGS, f"pipeline.output_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"{ckpt.checkpoint_dir(run_dir, 2)} is damaged" in out and "falling back" in out
    assert _records(run_dir) == expected and ckpt.damage(ckpt.checkpoint_dir(run_dir, 2)) is None


def test_restart_starts_over_a_run_stopped_before_its_first_checkpoint(run_copy, capsys):
    """A run with logs but no checkpoint is neither resumable nor startable again; --restart must start it over,
    moving its files aside (never deleting them silently)."""
    pipeline, run_dir = run_copy
    shutil.rmtree(run_dir / "checkpoints")
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    settings = [*SETTINGS, f"pipeline.output_dir={run_dir}"]
    assert _run(pipeline, settings=settings) == 2
    assert "--restart" in capsys.readouterr().err
    assert _run(pipeline, "--resume", str(run_dir), settings=settings) == 2
    assert "--restart" in capsys.readouterr().err
    assert _run(pipeline, "--restart", settings=settings) == 0
    assert "--restart: moved" in capsys.readouterr().out
    (previous,) = (run_dir / "previous-attempts").iterdir()
    assert (previous / "metrics.jsonl").read_text() == old_metrics
    assert _train_steps(run_dir) == [1, 2] and ckpt.complete_steps(run_dir) == [1, 2]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("holder, refused_with_flag, words", [
    ({"pid": "own", "host": "this"}, True, "in use by pid"),
    ({"pid": "dead", "host": "this"}, False, "stale"),
    ({"pid": 1, "host": "elsewhere.example"}, False, "another host"),
    ("", True, "empty or unreadable"),
    ('{"pid": 12', True, "empty or unreadable"),
    ("[1]", True, "empty or unreadable"),
])
def test_lock_of_another_run(run_copy, capsys, holder, refused_with_flag, words):
    """A live run's lock must always refuse a second run (exit 2, naming the lock and the pid); a stale lock (its
    process gone) or one from another host only until --take-over-lock is passed. An empty or cut-short lock may be
    one being written right now: it must never be taken over (it was called stale and deleted under a live run)."""
    pipeline, run_dir = run_copy
    lock = run_dir / "run.lock"
    if isinstance(holder, str):
        lock.write_text(holder)
    else:
        pid = {"own": os.getpid(), "dead": _dead_pid()}.get(holder["pid"], holder["pid"])
        host = socket.gethostname() if holder["host"] == "this" else holder["host"]
        lock.write_text(json.dumps({"pid": pid, "host": host, "started": "earlier"}))
    before = _tree(run_dir)
    settings = [*SETTINGS, f"pipeline.output_dir={run_dir}"]
    assert _run(pipeline, "--resume", str(run_dir), settings=settings) == 2
    message = capsys.readouterr().err
    assert "run.lock" in message and words in message and _tree(run_dir) == before, message
    if not refused_with_flag:
        assert "--take-over-lock" in message
    code = _run(pipeline, "--resume", str(run_dir), "--take-over-lock", settings=settings)
    assert code == (2 if refused_with_flag else 0)
    assert lock.exists() == refused_with_flag  # a run that took the lock over releases it at the end


@pytest.mark.parametrize("name", ["../../escape", "", "a/b", ".", "..", "back\\slash"])
def test_run_name_must_be_a_folder_name(name, capsys):
    """A name with a path in it wrote outside runs/ ('' wrote into runs/ itself): the config check (so `plan`
    too) must refuse it, naming pipeline.name."""
    with pytest.raises(ConfigError, match="pipeline.name"):
        load_pipeline(PIPELINES / "tiny.toml", [f"pipeline.name={json.dumps(name)}"])
    assert main(["plan", str(PIPELINES / "tiny.toml"), "--set", f"pipeline.name={json.dumps(name)}"]) == 2


def test_output_dir_that_is_a_file(tmp_path, capsys):
    """An output_dir that is an existing file must be an error naming it (it was a raw traceback)."""
    target = tmp_path / "taken"
    target.write_text("not a directory")
    assert _run(PIPELINES / "tiny.toml", settings=[*SETTINGS, f"pipeline.output_dir={target}"]) == 2
    assert f"{target} is a file" in capsys.readouterr().err and target.read_text() == "not a directory"


@pytest.mark.parametrize("line", ['{"step": 2', "[1]", "7", '"text"', "null", '{"step": "2"}', '{"step": true}',
                                  '{"step": 2.5}'])
def test_damaged_log_line_is_a_run_directory_error(tmp_path, line):
    """A log line before the last that is not JSON, not an object, or has a step that is not an integer must be a
    RunDirectoryError naming file:line, and leave the log as it was (they were a ValueError, AttributeError or
    TypeError traceback)."""
    log = tmp_path / "metrics.jsonl"
    text = f'{{"step": 1}}\n{line}\n{{"step": 3}}\n'
    log.write_text(text)
    with pytest.raises(RunDirectoryError, match=f"{log}:2"):
        truncate_jsonl(log, 3)
    assert log.read_text() == text


def test_two_restarts_in_one_second_keep_both_attempts(run_copy, monkeypatch, capsys):
    """previous-attempts/ folders are named to the second: a second --restart within that second must move its
    files to a new folder, not fail on (or merge into) the first one."""
    pipeline, run_dir = run_copy
    shutil.rmtree(run_dir / "checkpoints")
    monkeypatch.setattr(run_directory.time, "strftime", lambda pattern, *when: "20250101-120000")
    settings = [*SETTINGS, f"pipeline.output_dir={run_dir}", "pipeline.num_steps=1"]
    first = (run_dir / "metrics.jsonl").read_text()
    assert _run(pipeline, "--restart", settings=settings) == 0
    second = (run_dir / "metrics.jsonl").read_text()
    shutil.rmtree(run_dir / "checkpoints")  # the run ended with one: stopped before it again
    assert _run(pipeline, "--restart", settings=settings) == 0
    attempts = run_dir / "previous-attempts"
    assert sorted(p.name for p in attempts.iterdir()) == ["20250101-120000", "20250101-120000-2"]
    assert (attempts / "20250101-120000" / "metrics.jsonl").read_text() == first
    assert (attempts / "20250101-120000-2" / "metrics.jsonl").read_text() == second


def test_restart_hint_of_a_failed_resume_names_that_directory(run_copy, tmp_path, monkeypatch, capsys):
    """`--resume DIR` of a run without a checkpoint suggests --restart; with no output_dir set that restarted the
    default runs/<name>, not DIR. The hint must carry DIR (shell-quoted), and running it must restart DIR."""
    pipeline, run_dir = run_copy
    spaced = tmp_path / "run with space"
    run_dir.rename(spaced)
    shutil.rmtree(spaced / "checkpoints")
    monkeypatch.chdir(tmp_path)
    settings = [*SETTINGS, "pipeline.num_steps=1"]
    assert _run(pipeline, "--resume", str(spaced), settings=settings) == 2
    message = capsys.readouterr().err
    hint = f"--restart --set {shlex.quote(f'pipeline.output_dir={spaced}')}"
    assert f"pass {hint} instead of --resume" in message, message
    assert _run(pipeline, *shlex.split(hint), settings=settings) == 0
    assert "--restart: moved" in capsys.readouterr().out
    assert (spaced / "previous-attempts").is_dir() and not (tmp_path / "runs").exists()
    assert _train_steps(spaced) == [1]


def test_first_signal_asks_second_stops_at_once():
    """During training the first SIGINT only records a request; a second one (or any during startup) raises
    Interrupted at once: fails if Ctrl-C is lost, or a second Ctrl-C cannot stop a stuck run."""
    with StopRequests() as stops:
        with pytest.raises(Interrupted):  # startup: at once
            os.kill(os.getpid(), signal.SIGTERM)
        stops.graceful = True
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.signum == signal.SIGINT and stops.flags() == [1.0, 0.0]
        with pytest.raises(Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
    assert second.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are put back


def test_every_rank_stops_for_the_same_signal():
    """A rank that saw no signal must stop when another did (its flags arrive summed), SIGTERM first."""
    assert chosen_signal(None, [0.0, 0.0]) is None
    assert chosen_signal(None, [1.0, 0.0]) == signal.SIGINT
    assert chosen_signal(None, [1.0, 1.0]) == signal.SIGTERM
    assert chosen_signal(signal.SIGINT, [1.0, 1.0]) == signal.SIGINT


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_exits_with_the_signal_code(monkeypatch, capsys, signum, code):
    """A run stopped at once must exit 128 + signal without a traceback (it was a KeyboardInterrupt trace)."""
    import opdgraph.cli as cli

    def interrupted(args):
        raise Interrupted(signum)

    monkeypatch.setitem(cli.SUBCOMMANDS, "run", (*cli.SUBCOMMANDS["run"][:2], interrupted))
    assert main(["run", str(PIPELINES / "tiny.toml")]) == code
    assert "Traceback" not in capsys.readouterr().err
