"""Real processes, really killed: `python -m opdgraph run` stopped by SIGKILL at random instants, by SIGKILL at the one
instant where a checkpoint is complete and the step's records are not yet written (the old order), and by SIGINT /
SIGTERM; resumed until done, each run's final logs must equal an uninterrupted run's.

Compared: every record of metrics.jsonl and samples.jsonl, without the fields that measure the process (keys
containing `seconds` or `tokens_per_s`, and `peak_memory_gib`; README, "Runs, resume and failures"). All runs use
one thread (OMP_NUM_THREADS=1) so that an in-order float sum is the same in every process. Sized for a 2-core CI
machine: 8 steps of the tiny pipeline, about 4 s to start a process.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
NUM_STEPS = 8
SETTINGS = ["pipeline.device=cpu", "log.progress=false", f"pipeline.num_steps={NUM_STEPS}",
            "checkpoint.every_n_steps=1", "checkpoint.keep_last=2", "eval.every_n_steps=4", "eval.num_prompts=1",
            "eval.max_new_tokens=4", "log.sample_every_n_steps=1"]
PROCESS_FIELDS = ("seconds", "tokens_per_s", "peak_memory_gib")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Runs the CLI with save_checkpoint patched to SIGKILL the process right after checkpoint step 3 is complete.
KILLED_AFTER_CHECKPOINT = """
import os, signal, sys
from opdgraph.runtime import checkpoint
original = checkpoint.save_checkpoint
def save_then_die(run_dir, step, **kwargs):
    path = original(run_dir, step, **kwargs)
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpoint.save_checkpoint = save_then_die
from opdgraph.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _arguments(run_dir: Path, *extra: str) -> list[str]:
    settings = [*SETTINGS, f"pipeline.output_dir={run_dir}", *extra]
    return ["run", str(TINY), *(word for setting in settings for word in ("--set", setting))]


def _start(arguments: list[str], *, script: str | None = None) -> subprocess.Popen:
    program = [sys.executable, "-c", script] if script else [sys.executable, "-m", "opdgraph"]
    return subprocess.Popen([*program, *arguments], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _logs(run_dir: Path) -> dict[str, list[dict]]:
    def read(name):
        path = run_dir / name
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [{k: v for k, v in r.items() if not any(field in k for field in PROCESS_FIELDS)} for r in records]

    return {name: read(name) for name in ("metrics.jsonl", "samples.jsonl")}


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step-*/COMPLETE"))


def _leftovers(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob(".*")
            if ".tmp-" in p.name or p.name.startswith((".old-", ".pruned-", ".run.lock."))]


def _train_steps(run_dir: Path) -> list[int]:
    """The steps of the train records in metrics.jsonl now (a line being written is skipped)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def _wait_for_training(process: subprocess.Popen, run_dir: Path, *, after_step: int = 0,
                       timeout: float = 120) -> bool:
    """Until a train record of a step after `after_step` is written (True), or the process ended (False). A resumed
    attempt starts with the earlier attempts' records in the log: waiting for any train record returned at once,
    so the kill landed during startup."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if any(step > after_step for step in _train_steps(run_dir)):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[dict]]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = _finish(_start(_arguments(run_dir)))
    assert code == 0, err
    logs = _logs(run_dir)
    assert [r["step"] for r in logs["metrics.jsonl"] if r["kind"] == "train"] == list(range(1, 9))
    return logs


def _resume_until_done(run_dir: Path, *, rng: random.Random, kills: int) -> int:
    """Start, SIGKILL `kills` times at random instants of training (each after a step this attempt trained), resume
    (or restart) each time, until a run finishes; how many kills landed in training."""
    landed = 0
    for attempt in range(kills + 4):
        flags = (["--resume", str(run_dir)] if _has_checkpoint(run_dir) else ["--restart"]) if attempt else []
        logged = max(_train_steps(run_dir), default=0)  # records of earlier attempts (a resume may cut them back)
        process = _start([*_arguments(run_dir), *flags, "--take-over-lock"])
        if attempt < kills and _wait_for_training(process, run_dir, after_step=logged):
            # A random instant within 1.2 s, but early enough that every later kill still finds training left: on a
            # fast machine the few steps after a late first kill all finished inside the delay, and the second kill
            # found no run. Attempt a is killed by the record of step NUM_STEPS - (kills - a) at the latest.
            latest = NUM_STEPS - (kills - attempt)
            deadline = time.monotonic() + rng.uniform(0.0, 1.2)
            while time.monotonic() < deadline and max(_train_steps(run_dir), default=0) < latest:
                time.sleep(0.005)
            landed += process.poll() is None
            process.send_signal(signal.SIGKILL)
        code, _, err = _finish(process)
        assert "Traceback" not in err, err
        if code == 0:
            return landed
        assert code == -signal.SIGKILL, err
    raise AssertionError(f"{run_dir} did not finish")


@pytest.mark.parametrize("trial", range(2))
def test_kill_9_at_random_instants_loses_nothing(reference, tmp_path, trial):
    """SIGKILL at random instants of training (twice per trial, the second in the resumed attempt's own training)
    and resume: the final logs must equal the uninterrupted run's, every step once. Fails if a kill loses a step's
    record, repeats one, or leaves a state no resume can continue."""
    run_dir = tmp_path / "run"
    landed = _resume_until_done(run_dir, rng=random.Random(1000 + trial), kills=2)
    assert landed == 2  # each kill comes while steps are left (see _resume_until_done)
    assert _logs(run_dir) == reference
    assert not _leftovers(run_dir)


def test_kill_right_after_a_checkpoint_is_complete(reference, tmp_path):
    """The instant that lost a record before: checkpoint 3 complete, the process SIGKILLed at once. The step's
    records must already be durable (they are written before the checkpoint), so the resumed logs are whole."""
    run_dir = tmp_path / "run"
    code, _, err = _finish(_start(_arguments(run_dir), script=KILLED_AFTER_CHECKPOINT))
    assert code == -signal.SIGKILL, err
    assert (run_dir / "checkpoints" / "step-000003" / "COMPLETE").is_file()
    assert not (run_dir / "checkpoints" / "step-000004").exists()
    code, _, err = _finish(_start([*_arguments(run_dir), "--resume", str(run_dir), "--take-over-lock"]))
    assert code == 0, err
    assert _logs(run_dir) == reference


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_step_with_a_checkpoint(reference, tmp_path, signum, exit_code):
    """SIGINT / SIGTERM during training: the run must finish its step, checkpoint it (checkpoint.every_n_steps = 0,
    so only the signal saves), print the command that resumes, exit 130 / 143 with no traceback and no temporary
    folder, and that command must finish the run with the uninterrupted run's logs. Meanwhile a second `opdgraph
    run` on the same directory must be refused (exit 2, naming the lock): fails if two runs can share one."""
    run_dir = tmp_path / "run"
    arguments = _arguments(run_dir, "checkpoint.every_n_steps=0")
    process = _start(arguments)
    _wait_for_training(process, run_dir)
    process.send_signal(signal.SIGSTOP)  # paused (alive, holding the lock) while the second run tries
    intruder = _finish(_start([*arguments, "--resume", str(run_dir)]))
    process.send_signal(signum)  # delivered when it goes on
    process.send_signal(signal.SIGCONT)
    code, _, err = _finish(process)
    assert code == exit_code, err
    assert "Traceback" not in err and not _leftovers(run_dir)
    assert intruder[0] == 2 and "run.lock" in intruder[2] and "in use by pid" in intruder[2], intruder[2]
    stopped_at = max(r["step"] for r in _logs(run_dir)["metrics.jsonl"] if r["kind"] == "train")
    assert 1 <= stopped_at < 8
    assert (run_dir / "checkpoints" / f"step-{stopped_at:06d}" / "COMPLETE").is_file()
    lines = err.splitlines()
    command = shlex.split(lines[lines.index(next(line for line in lines if line.endswith("Resume with:"))) + 1])
    assert command[:2] == ["opdgraph", "run"] and command[-2:] == ["--resume", str(run_dir)], err
    code, _, err = _finish(_start(command[1:]))
    assert code == 0, err
    assert _logs(run_dir) == reference
