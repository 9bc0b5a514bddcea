"""The run lock and the run directory under races: a lock is never seen half written, of runs starting at once on a
new directory exactly one wins and the others are refused (exit 2, no traceback), a stale lock is taken over only
when it is still the one judged stale, a lock released mid-look is simply taken, and temporary lock files a kill
left are cleaned. Lock policy through `opdgraph run` (live, stale, other-host, unreadable locks): test_run_safety.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from opdgraph.config import load_pipeline
from opdgraph.errors import RunDirectoryError
from opdgraph.runtime import run_lock
from opdgraph.runtime.run_directory import RunRequest, open_run_directory
from opdgraph.runtime.run_lock import LOCK_NAME, RunLock

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _stale_lock(run_dir: Path) -> bytes:
    data = json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "earlier"}).encode()
    (run_dir / LOCK_NAME).write_bytes(data)
    return data


def _temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)


def test_a_lock_is_never_seen_empty_or_half_written(tmp_path):
    """A reader looking at run.lock while runs take and release it must always read a whole lock: the lock used to
    exist empty between its create and its write, so a second run called it stale and deleted a live lock."""
    done, seen_bad = threading.Event(), []

    def read_all_the_time():
        while not done.is_set():
            try:
                data = (tmp_path / LOCK_NAME).read_bytes()
            except FileNotFoundError:
                continue
            if run_lock._parse(data) is None:
                seen_bad.append(data)

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for _ in range(300):
            RunLock(tmp_path, take_over=False).release()
    finally:
        done.set()
        reader.join()
    assert not seen_bad and not _temporaries(tmp_path)


def test_new_runs_starting_at_once_one_wins(tmp_path):
    """Threads opening one new run directory (and its new parent) at the same instant: exactly one must get it and
    every other a RunDirectoryError naming the lock (it was a FileExistsError traceback from mkdir, or a lost
    error when the loser's rmdir met the winner's lock)."""
    cfg_of = {}
    for trial in range(12):
        run_dir = tmp_path / f"parent-{trial}" / "run"
        cfg_of[trial] = load_pipeline(TINY, [f"pipeline.output_dir={run_dir}"])
        barrier, outcomes = threading.Barrier(4), []

        def start(cfg=cfg_of[trial]):
            barrier.wait()
            try:
                outcomes.append(open_run_directory(cfg, RunRequest(), config_record={}))
            except RunDirectoryError as error:
                outcomes.append(error)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [o for o in outcomes if not isinstance(o, RunDirectoryError)]
        assert len(outcomes) == 4 and len(winners) == 1, outcomes  # any other exception would be missing here
        assert all("run.lock" in str(o) and "in use by" in str(o) for o in outcomes if o not in winners), outcomes
        assert (run_dir / LOCK_NAME).is_file() and _temporaries(run_dir) == []
        winners[0].close()
        # the winner wrote nothing; the directory is gone when the winner made it, else empty (its maker lost)
        assert not run_dir.exists() or not any(run_dir.iterdir())


# Each process announces it is ready, waits until every process is, then opens the run directory through the CLI's
# `run` (the pipeline itself is never reached: a winner prints "won" and exits 0 while still holding the lock).
RACER = """
import sys, time
from pathlib import Path
from opdgraph.runtime import run
real = run.open_run_directory
def at_once(*args, **kwargs):
    Path(sys.argv[1] + '.' + sys.argv[2]).touch()
    while len(list(Path(sys.argv[1]).parent.glob(Path(sys.argv[1]).name + '.*'))) < int(sys.argv[3]):
        time.sleep(0.001)
    directory = real(*args, **kwargs)
    print('won', flush=True)
    time.sleep(1.0)  # hold the lock while the others are refused
    directory.close()
    sys.exit(0)
run.open_run_directory = at_once
from opdgraph.cli import main
sys.exit(main(sys.argv[4:]))
"""


def test_new_runs_starting_at_once_in_processes(tmp_path):
    """Two `opdgraph run` processes on one new directory at the same instant: one must win, the others exit 2 with
    the lock's message and no traceback (this is what a user starting two jobs at once sees)."""
    run_dir, ready = tmp_path / "new" / "run", tmp_path / "ready"
    arguments = ["run", str(TINY), "--set", "pipeline.device=cpu", "--set", f"pipeline.output_dir={run_dir}"]
    processes = [subprocess.Popen([sys.executable, "-c", RACER, str(ready), str(n), "2", *arguments], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in processes]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    assert all("Traceback" not in err for _, _, err in results), results
    assert all("run.lock" in err for code, _, err in results if code == 2), results
    assert [out for code, out, _ in results if code == 0] == ["won\n"]


def test_take_over_keeps_a_lock_another_run_took_over_first(tmp_path, monkeypatch):
    """Between judging a lock stale and renaming it aside, another run may take it over: the renamed file is then
    that run's live lock, which must be put back and this run refused (it deleted the other run's lock)."""
    _stale_lock(tmp_path)
    live = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "the other run"}).encode()
    real_rename = os.rename

    def other_run_wins_first(source, target):
        (tmp_path / LOCK_NAME).unlink()
        (tmp_path / LOCK_NAME).write_bytes(live)
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", other_run_wins_first)
    with pytest.raises(RunDirectoryError, match="another run took the lock over at the same time"):
        RunLock(tmp_path, take_over=True)
    assert (tmp_path / LOCK_NAME).read_bytes() == live and not _temporaries(tmp_path)


def test_take_over_of_a_stale_lock(tmp_path):
    """A stale lock with --take-over-lock: ours replaces it, says whose it was, and leaves no temporary file."""
    _stale_lock(tmp_path)
    lock = RunLock(tmp_path, take_over=True)
    assert any("stale" in message for message in lock.messages), lock.messages
    assert run_lock._parse((tmp_path / LOCK_NAME).read_bytes())["pid"] == os.getpid()
    assert not _temporaries(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_released_while_looked_at_is_taken(tmp_path, monkeypatch):
    """The link fails because a lock exists, which its holder removes before we read it: this run must simply take
    the lock (the retry used to raise a bare FileExistsError)."""
    real_link, calls = os.link, []

    def held_then_released(source, target):
        calls.append(target)
        if len(calls) == 1:
            raise FileExistsError(target)
        real_link(source, target)

    monkeypatch.setattr(os, "link", held_then_released)
    lock = RunLock(tmp_path, take_over=False)
    assert len(calls) == 2 and run_lock._parse((tmp_path / LOCK_NAME).read_bytes())["token"] == lock.token


def test_temporary_lock_files_of_killed_processes_are_removed(tmp_path):
    """A kill between writing a temporary lock file and removing it leaves one behind: the next run to get the lock
    must remove those of dead processes on this host, and keep those of live processes (a run starting now) and
    of other hosts (which cannot be checked from here)."""
    host = socket.gethostname()
    dead = [f".{LOCK_NAME}.{host}.{_dead_pid()}.1.new", f".{LOCK_NAME}.{host}.{_dead_pid()}.2.stale"]
    kept = [f".{LOCK_NAME}.{host}.{os.getpid()}.3.new", f".{LOCK_NAME}.elsewhere.example.{_dead_pid()}.4.new"]
    for name in dead + kept:
        (tmp_path / name).write_text("")
    RunLock(tmp_path, take_over=False).release()
    assert _temporaries(tmp_path) == sorted(kept)
