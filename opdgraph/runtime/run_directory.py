"""The run-directory policy of `opdgraph run`: which directory a run writes, when it may, and what it writes first.

Which directory:
- a new run (no flag): pipeline.output_dir, default runs/<pipeline.name>. It must not hold a run already
  (metrics.jsonl, samples.jsonl, checkpoints/ or tensorboard/); config.toml and plan files alone (a start that
  failed before its first record) do not count and are replaced.
- `--resume DIR`: DIR is the run directory, continued from its newest intact checkpoint (DIR may also be one
  checkpoint, DIR = <run>/checkpoints/step-N: that checkpoint of that run). DIR must exist; a pipeline.output_dir
  that names another directory is an error.
- `--restart`: the configured directory of a run that has no intact checkpoint (it was stopped before its first):
  its files move to previous-attempts/<time>/ inside it and the run starts over. A run with an intact checkpoint is
  never restarted (resume it, or choose another output_dir).

When: `open_run_directory` takes the directory's lock (opdgraph.runtime.run_lock), then checks everything (the
checkpoint to resume and its checksums, the config against the checkpoint's, opdgraph.runtime.config_record). A
failed check releases the lock and leaves the directory as it was (a directory it created is removed again). Once
the checks pass, folders that killed checkpoint writes left are cleaned (opdgraph.runtime.checkpoint).

What it writes first (`begin`, called once the models and data are loaded): a new run writes config.toml (the
resolved config), plan.txt and plan.json; a resume moves checkpoints newer than the resumed one aside, cuts the logs
back to its step, appends what changed to config.toml (the original is never rewritten) and writes the plan again
only if it changed (plan-resumed-step-N.txt/json). Under torchrun only rank 0 does any of this.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from opdgraph.errors import CheckpointError, RunDirectoryError
from opdgraph.runtime import checkpoint as ckpt
from opdgraph.runtime.config_record import describe, differences, is_cadence, is_newer_default
from opdgraph.runtime.durable import append_text, fsync_dir, replace_text
from opdgraph.runtime.run_lock import LOCK_NAME, RunLock
from opdgraph.runtime.run_logs import truncate_run_logs

RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "checkpoints", "tensorboard")
PREVIOUS_ATTEMPTS = "previous-attempts"
ALLOW_CHANGE_FLAG = "--allow-config-change"


@dataclass
class RunRequest:
    """What the command line asked for (opdgraph.cli, `run`)."""

    resume: Path | None = None
    restart: bool = False
    allow_config_change: bool = False
    take_over_lock: bool = False


def configured_directory(cfg) -> Path:
    """pipeline.output_dir (`~` expanded, as data paths are), else runs/<name> under the working directory."""
    return Path(os.path.expanduser(cfg.pipeline.output_dir or f"runs/{cfg.pipeline.name}"))


def resolve(cfg, request: RunRequest) -> tuple[Path, Path | None]:
    """(run directory, the checkpoint --resume named or None); reads only."""
    if request.resume is None:
        run_dir = configured_directory(cfg)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirectoryError(f"pipeline.output_dir {run_dir} is a file, not a directory; choose another "
                                    "output_dir (e.g. --set pipeline.output_dir=runs/other)")
        return run_dir, None
    given = Path(request.resume)
    if not given.is_dir():
        what = "is a file, not a directory" if given.exists() else "does not exist"
        raise RunDirectoryError(f"--resume {given}: {what}; pass the run directory of the run to continue "
                                "(runs/<name>, where its checkpoints/ are)")
    chosen = given if ckpt.STEP_NAME.fullmatch(given.name) and given.parent.name == "checkpoints" else None
    run_dir = given.parent.parent if chosen is not None else given
    explicit = cfg.provenance.get("pipeline.output_dir", "default") != "default"  # the loader fills the default in
    if explicit and configured_directory(cfg).resolve() != run_dir.resolve():
        raise RunDirectoryError(f"--resume {given} continues the run in {run_dir}, but pipeline.output_dir is "
                                f"{cfg.pipeline.output_dir}; a resumed run writes where it was resumed from: drop "
                                f"pipeline.output_dir or set it to {run_dir}")
    return run_dir, chosen


def _holds_run(run_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


@dataclass
class RunDirectory:
    """A checked run directory whose lock this process holds (rank 0 only)."""

    path: Path
    lock: RunLock
    created: bool
    request: RunRequest
    step: int = 0  # the checkpoint step resumed from (0: a new run)
    changes: list = field(default_factory=list)  # ((key, old, new), cadence?) config differences from the checkpoint's

    @property
    def checkpoint(self) -> Path | None:
        return ckpt.checkpoint_dir(self.path, self.step) if self.request.resume is not None else None

    def begin(self, cfg, plan) -> None:
        """The first writes of the run (every check has passed)."""
        if self.request.resume is None:
            if self.request.restart:
                self._move_previous_attempt()
            _write_start_files(cfg, plan, self.path)
            return
        for message in ckpt.set_aside_newer(self.path, self.step):
            print(message)
        truncate_run_logs(self.path, self.step)  # lines a killed run logged after the checkpoint would repeat
        self._append_history(cfg, plan)

    def _move_previous_attempt(self) -> None:
        moved = [p for p in sorted(self.path.iterdir()) if p.name not in (LOCK_NAME, PREVIOUS_ATTEMPTS)]
        if not moved:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, number = self.path / PREVIOUS_ATTEMPTS / stamp, 1
        while target.exists():  # two restarts within one second
            number += 1
            target = self.path / PREVIOUS_ATTEMPTS / f"{stamp}-{number}"
        target.mkdir(parents=True)
        for path in moved:
            os.replace(path, target / path.name)
        fsync_dir(target)
        fsync_dir(self.path)
        print(f"--restart: moved the stopped attempt's files ({', '.join(p.name for p in moved)}) to {target}")

    def _append_history(self, cfg, plan) -> None:
        from opdgraph.render import render_json, render_text

        config_file = self.path / "config.toml"
        if not config_file.exists():
            _write_start_files(cfg, plan, self.path)
        lines = [f"\n# ---- resumed from {self.checkpoint} at step {self.step}, "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} ----"]
        lines += [f"# changed ({'cadence' if cadence else 'accepted by ' + ALLOW_CHANGE_FLAG}): {describe(change)}"
                  for change, cadence in self.changes] or ["# config unchanged"]
        plan_text = render_text(plan)
        old_plan = self.path / "plan.txt"
        if old_plan.exists() and old_plan.read_text() != plan_text:
            stem = self.path / f"plan-resumed-step-{self.step:06d}"
            replace_text(stem.with_suffix(".txt"), plan_text)
            replace_text(stem.with_suffix(".json"), render_json(plan))
            lines.append(f"# the plan changed: {stem.name}.txt / .json")
        append_text(config_file, "\n".join(lines) + "\n")

    def close(self) -> None:
        """Release the lock; remove the directory again if this run created it and wrote nothing."""
        self.lock.release()
        if self.created:
            _remove_if_empty(self.path)


def _remove_if_empty(run_dir: Path) -> None:
    """Remove a directory this run created and left empty; one that another run has begun to use meanwhile (its
    lock is in it) stays, and so does any error this removal would otherwise hide."""
    try:
        run_dir.rmdir()
    except OSError:
        pass


def _write_start_files(cfg, plan, run_dir: Path) -> None:
    from opdgraph.config import render_resolved
    from opdgraph.render import render_json, render_text

    replace_text(run_dir / "config.toml", render_resolved(cfg))
    replace_text(run_dir / "plan.txt", render_text(plan))
    replace_text(run_dir / "plan.json", render_json(plan))


def open_run_directory(cfg, request: RunRequest, *, config_record: dict) -> RunDirectory:
    """Lock and check the run directory the request names (see the module docstring); raises RunDirectoryError or
    CheckpointError, saying what to do, when it cannot be used."""
    run_dir, chosen = resolve(cfg, request)
    try:
        run_dir.mkdir(parents=True)
        created = True
    except FileExistsError:  # it was there, or another run starting at the same time made it: the lock decides
        created = False
    try:
        lock = RunLock(run_dir, take_over=request.take_over_lock)
    except BaseException:
        if created:
            _remove_if_empty(run_dir)
        raise
    directory = RunDirectory(path=run_dir, lock=lock, created=created, request=request)
    for message in lock.messages:
        print(f"{run_dir}: {message}")
    try:
        _check(directory, chosen, config_record, _restart_words(cfg, run_dir))
    except BaseException:
        directory.close()
        raise
    for message in ckpt.clean_leftovers(run_dir):
        print(message)
    for tmp in sorted(run_dir.glob(".*.tmp-*")):  # a log being cut back or a file being replaced when killed
        tmp.unlink()
        print(f"removed {tmp} (left by a write that was cut short)")
    return directory


def _restart_words(cfg, run_dir: Path) -> str:
    """The flags that restart `run_dir`: --restart starts over the configured directory, which a `--resume DIR`
    need not be."""
    if Path(run_dir).resolve() == configured_directory(cfg).resolve():
        return "--restart"
    return f"--restart --set {shlex.quote(f'pipeline.output_dir={run_dir}')}"


def _check(directory: RunDirectory, chosen: Path | None, config_record: dict, restart: str) -> None:
    if directory.request.resume is not None:
        _check_resume(directory, chosen, config_record, restart)
    else:
        _check_new_run(directory)


def _check_resume(directory: RunDirectory, chosen: Path | None, config_record: dict, restart: str) -> None:
    """The checkpoint to resume (the newest intact one, or `chosen`), and the config changes since it."""
    run_dir = directory.path
    directory.step, checkpoint, messages = ckpt.resumable_checkpoint(run_dir, chosen, restart=restart)
    for message in messages:
        print(message)
    old_record = ckpt.read_config_record(checkpoint)
    kinds = {**old_record.get("stage_kinds", {}), **config_record["stage_kinds"]}
    directory.changes = [(change, is_cadence(change[0], kinds) or is_newer_default(change, config_record))
                         for change in differences(old_record, config_record)]
    blocking = [change for change, cadence in directory.changes if not cadence]
    if blocking and not directory.request.allow_config_change:
        listed = "\n".join(f"  {describe(change)}" for change in blocking)
        raise CheckpointError(
            f"--resume {run_dir}: the config differs from the one {checkpoint} was trained with, in settings that "
            f"change the math or the data order:\n{listed}\nrestore them to continue the run exactly, or pass "
            f"{ALLOW_CHANGE_FLAG} to continue with these changes on purpose (they are then recorded in config.toml)")
    for change, cadence in directory.changes:
        print(f"resume: config change {describe(change)}{'' if cadence else f' (accepted by {ALLOW_CHANGE_FLAG})'}")


def _check_new_run(directory: RunDirectory) -> None:
    """A new run needs a directory without a run; --restart one without an intact checkpoint."""
    run_dir = directory.path
    outputs = _holds_run(run_dir)
    if not outputs:
        return
    if not directory.request.restart:
        steps = ckpt.complete_steps(run_dir)
        then = (f"it has a checkpoint (step {steps[-1]}): pass --resume {run_dir} to continue it" if steps else
                "it has no complete checkpoint: pass --restart to start it over (its files move to "
                f"{run_dir}/{PREVIOUS_ATTEMPTS}/)")
        raise RunDirectoryError(f"{run_dir} already holds a run ({', '.join(outputs)}); {then}, or set "
                                "pipeline.output_dir (e.g. --set pipeline.output_dir=runs/other) for a new run")
    try:
        _, checkpoint, _ = ckpt.resumable_checkpoint(run_dir)
    except CheckpointError:
        return  # nothing intact to lose: the restart may go ahead
    raise RunDirectoryError(f"--restart {run_dir}: it has an intact checkpoint ({checkpoint}), so it is not a run "
                            f"stopped before its first checkpoint; pass --resume {run_dir} to continue it, or set "
                            "pipeline.output_dir for a new run")
