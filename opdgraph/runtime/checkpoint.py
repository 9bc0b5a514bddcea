"""Atomic checkpoints of a run and exact resume.

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding:
- `student/`: the student's weights in Hugging Face format (config.json + safetensors + tokenizer files), loadable
  by transformers as is;
- `trainer.pt`: optimizer state (fp32 master weights and moments), the data cursor, RNG states;
- `state.json`: step number and the small facts a person wants to read without torch;
- `COMPLETE`: written last.
Everything is written into a hidden temporary directory first and renamed into place in one `os.replace`, so a
killed process leaves either no checkpoint or a whole one; `latest_checkpoint` only ever picks whole ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE_MARKER = "COMPLETE"


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


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(run_dir: Path, step: int, *, save_student, trainer_state: dict[str, Any],
                    summary: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` atomically; `save_student(directory)` writes the HF-format weights."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_student(tmp / "student")
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **summary}, indent=2, sort_keys=True) + "\n")
    _fsync_tree(tmp)
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    if final.exists():  # a re-run of the same step (after resume) replaces the older copy whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(final.parent, keep_last)
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in _complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)


def latest_checkpoint(path: Path) -> Path:
    """`path` is a run directory or a checkpoint directory; returns the newest complete checkpoint in it."""
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    found = _complete_checkpoints(path / "checkpoints")
    if not found:
        raise FileNotFoundError(
            f"--resume {path}: no complete checkpoint found (looked for {path}/checkpoints/step-*/{COMPLETE_MARKER});"
            " pass a run directory that has saved at least one checkpoint"
        )
    return found[-1]


def checkpoint_step(checkpoint: Path) -> int:
    """The training steps a checkpoint covers (from state.json: readable without loading the trainer state)."""
    return int(json.loads((Path(checkpoint) / "state.json").read_text())["step"])


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "trainer.pt", map_location="cpu", weights_only=False)
