"""Checkpoints of a run: atomic, checksummed, never replaced or pruned in a way a kill can break; exact resume.

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding:
- `student/`: the student's weights in Hugging Face format (config.json + safetensors + tokenizer files), loadable
  by transformers as is;
- `trainer.pt`: optimizer state (fp32 master weights and moments), the data cursor, RNG states;
- `state.json`: step number and the small facts a person wants to read without torch;
- `config.json`: the run's resolved config (opdgraph.runtime.config_record), which a resume compares with its own;
- `manifest.json`: size and checksum (opdgraph.runtime.durable.file_digest) of every file above;
- `COMPLETE`: written last; holds the checksum of manifest.json.

How a kill at any instant is survived:
- everything is written into `.tmp-step-N-<pid>/`, fsynced (files and folders), then renamed into place;
- re-saving a step that exists renames the old copy to `.old-step-N-<pid>`, renames the new one in, then deletes the
  old one: some complete copy exists at every instant;
- pruning renames `step-N` to `.pruned-step-N-<pid>` before deleting it, so no `step-N` ever lacks files;
- at the next start (under the run's lock) `clean_leftovers` deletes `.tmp-*` and `.pruned-*` folders and puts an
  `.old-*` copy back when its step has no other copy.
A damaged checkpoint (a file missing, cut short, emptied or with changed bytes) fails `damage()`; resume then falls
back to the newest intact one and says so (`resumable_checkpoint`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from opdgraph.errors import CheckpointError
from opdgraph.runtime.durable import DIGEST_NAME, file_digest, fsync_dir, fsync_file

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "manifest.json"
CONFIG_RECORD = "config.json"
STEP_NAME = re.compile(r"step-(\d+)")
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".pruned-")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, *, save_student, trainer_state: dict[str, Any],
                    summary: dict[str, Any], config_record: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically; `save_student(directory)` writes the HF-format weights."""
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        save_student(tmp / "student")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **summary}, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_RECORD).write_text(json.dumps(config_record, indent=1, sort_keys=True) + "\n")
        _write_manifest(tmp)
        _move_into_place(tmp, final)
    except BaseException:  # a second Ctrl-C or a failed write: leave no temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last)
    return final


def _write_manifest(folder: Path) -> None:
    """Checksum and fsync every file, then write manifest.json and COMPLETE (with the manifest's checksum)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fsync_file(path)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, DIGEST_NAME: file_digest(path)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    fsync_file(folder / MANIFEST)
    (folder / COMPLETE_MARKER).write_text(f"{DIGEST_NAME} {file_digest(folder / MANIFEST)}\n")
    fsync_file(folder / COMPLETE_MARKER)
    for directory in sorted({p.parent for p in folder.rglob("*")}, key=lambda p: -len(p.parts)):
        fsync_dir(directory)


def _move_into_place(tmp: Path, final: Path) -> None:
    root = final.parent
    if final.exists():  # a re-save of the same step: the old copy goes only once the new one is in place
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        fsync_dir(root)


def _prune(root: Path, keep_last: int) -> None:
    for step, old in sorted(_candidates(root).items())[:-keep_last]:
        doomed = root / f".pruned-{old.name}-{os.getpid()}"
        os.replace(old, doomed)  # from here on no step-N name points at a partial folder
        fsync_dir(root)
        shutil.rmtree(doomed)


def _candidates(root: Path) -> dict[int, Path]:
    """step -> its complete copy (an `.old-` copy stands in for a step that a kill left without its new copy)."""
    found: dict[int, Path] = {}
    if not root.is_dir():
        return found
    olds = []
    for path in root.iterdir():
        match = STEP_NAME.fullmatch(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found[int(match[1])] = path
        elif path.name.startswith(".old-step-") and (path / COMPLETE_MARKER).is_file():
            olds.append(path)
    for path in olds:
        found.setdefault(int(path.name.split("-")[2]), path)
    return found


def complete_steps(run_dir: Path) -> list[int]:
    """Steps with a complete (not necessarily intact) checkpoint, oldest first."""
    return sorted(_candidates(Path(run_dir) / "checkpoints"))


def leftovers(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if p.name.startswith(LEFTOVER_PREFIXES)) if root.is_dir() else []


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what killed writes and prunes left (the caller holds the run's lock); returns what was done."""
    done = []
    for path in leftovers(run_dir):
        if path.name.startswith(".old-"):
            final = path.parent / path.name.split("-", 1)[1].rsplit("-", 1)[0]
            if not (final / COMPLETE_MARKER).is_file():
                if final.exists():
                    shutil.rmtree(final)
                os.replace(path, final)
                done.append(f"restored {final} from {path.name} (a re-save of that step was cut short)")
                continue
        shutil.rmtree(path)
        done.append(f"removed {path} (left by a write or prune that was cut short)")
    if done:
        fsync_dir(Path(run_dir) / "checkpoints")
    return done


def damage(checkpoint: Path) -> str | None:
    """None when every file of the checkpoint is there with the size and checksum its manifest records; else what
    is wrong, naming the files."""
    checkpoint = Path(checkpoint)
    manifest_path = checkpoint / MANIFEST
    if not (checkpoint / COMPLETE_MARKER).is_file():
        return f"{COMPLETE_MARKER} is missing (its write was cut short, or this is not a checkpoint)"
    if not manifest_path.is_file():
        return f"{MANIFEST} is missing (no checksums to verify against)"
    marker = (checkpoint / COMPLETE_MARKER).read_text(errors="replace").split()
    if marker != [DIGEST_NAME, file_digest(manifest_path)]:
        return f"{MANIFEST} does not match the checksum in {COMPLETE_MARKER}"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"{MANIFEST} is not readable ({error})"
    problems = []
    for name, entry in sorted(files.items()):
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {entry['bytes']} were written (cut short, "
                            "emptied or overwritten)")
        elif file_digest(path) != entry[DIGEST_NAME]:
            problems.append(f"{name} has changed bytes (its checksum differs from the one written with it)")
    return "; ".join(problems) or None


def resumable_checkpoint(run_dir: Path, chosen: Path | None = None, *,
                         restart: str = "--restart") -> tuple[int, Path, list[str]]:
    """(step, path, messages) of the checkpoint to resume: `chosen` when given and intact, else the newest intact one;
    each damaged one skipped is named in a message. CheckpointError when there is none, naming `restart`, the
    flags that start `run_dir` over (opdgraph.runtime.run_directory)."""
    if chosen is not None:
        problem = damage(chosen)
        if problem:
            raise CheckpointError(f"{chosen} is damaged: {problem}. Pass --resume {run_dir} instead to resume from "
                                  "the newest intact checkpoint")
        return int(STEP_NAME.fullmatch(chosen.name)[1]), chosen, []
    root = Path(run_dir) / "checkpoints"
    candidates = _candidates(root)
    if not candidates:
        raise CheckpointError(
            f"--resume {run_dir}: no complete checkpoint in {root} (the run stopped before its first checkpoint, or "
            f"this is not a run directory); pass {restart} instead of --resume to start it over (its files move to "
            f"{run_dir}/previous-attempts/)")
    skipped = []
    for step, path in sorted(candidates.items(), reverse=True):
        problem = damage(path)
        if problem is None:
            messages = [f"resume: {where} is damaged ({why}); falling back to {path}" for where, why in skipped]
            return step, path, messages
        skipped.append((path, problem))
    listed = "\n".join(f"  {where}: {why}" for where, why in skipped)
    raise CheckpointError(f"--resume {run_dir}: every checkpoint is damaged:\n{listed}\nrestore one from a backup, "
                          f"or pass {restart} instead of --resume to start the run over")


def set_aside_newer(run_dir: Path, step: int) -> list[str]:
    """Rename checkpoints of steps after `step` (damaged ones, or newer ones when resuming from an older checkpoint)
    out of the way: they belong to a history the resumed run replaces, and must never be resumed or pruned into."""
    root = Path(run_dir) / "checkpoints"
    done = []
    for later, path in sorted(_candidates(root).items()):
        if later <= step:
            continue
        target = root / f"set-aside-step-{later:06d}"
        number = 1
        while target.exists():
            number += 1
            target = root / f"set-aside-step-{later:06d}-{number}"
        os.replace(path, target)
        done.append(f"resume: moved {path} to {target} (after the resumed step {step}; delete it when not needed)")
    if done:
        fsync_dir(root)
    return done


def read_config_record(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / CONFIG_RECORD).read_text())


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / "trainer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be loaded ({error}); resume from another checkpoint "
                              "(--resume <run dir>/checkpoints/step-N)") from error
