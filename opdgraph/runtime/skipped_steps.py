"""Skipped optimizer steps, and when they stop a run.

The optimizer step skips a step whose gradient norm is not finite, or whose update would make a weight non-finite
(then nothing changes: opdgraph.train.optimizer checks the whole update before writing any of it); the step's record
in metrics.jsonl says which (`skipped`). One skipped step is noise a run survives. `max_consecutive_skipped_steps`
skips in a row (the step stage's setting; 0 = never for that reason), or a run of which no step was applied at all,
means training is broken (a learning rate that blows the weights up, weights that already diverged, bad data) and
must not end as a success: `stop_if_stuck`, called after the step's record is written, raises TrainingStopped (the
CLI exits 2). Every rank takes the same decision: the norm and the finiteness of the update are reduced over ranks.
The counts travel in checkpoints (`state_dict`), so a resumed run stops exactly where an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opdgraph.errors import TrainingStopped

NON_FINITE_GRADIENT = "non-finite gradient norm"
NON_FINITE_UPDATE = "non-finite update"


@dataclass
class SkippedSteps:
    """What the optimizer steps of this process did: the current run of consecutive skips, and counts."""

    in_a_row: list[tuple[int, str]] = field(default_factory=list)  # (1-based step, reason)
    applied: int = 0
    skipped: int = 0
    limit: int = 0
    stage: str = "step"
    lr: float = 0.0

    def record(self, step: int, reason: str | None, config, stage: str) -> None:
        """One optimizer step's outcome (reason None: applied); `config` is the step stage's Config."""
        self.limit, self.stage, self.lr = config.max_consecutive_skipped_steps, stage, config.lr
        if reason is None:
            self.applied += 1
            self.in_a_row = []
        else:
            self.skipped += 1
            self.in_a_row.append((step, reason))

    def state_dict(self) -> dict:
        return {"in_a_row": [list(item) for item in self.in_a_row], "applied": self.applied, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row = [(int(step), str(reason)) for step, reason in state["in_a_row"]]
        self.applied, self.skipped = int(state["applied"]), int(state["skipped"])

    def stop_reason(self, *, last_step: bool) -> str | None:
        """Why the run must stop now (None: it goes on)."""
        if self.limit and len(self.in_a_row) >= self.limit:
            return f"{len(self.in_a_row)} optimizer steps in a row were skipped"
        if last_step and self.skipped and not self.applied:
            return f"all {self.skipped} optimizer steps of this run were skipped, so it trained nothing"
        return None


def stop_if_stuck(ctx, *, last_step: bool) -> None:
    """Raise TrainingStopped when the skipped steps say training is broken (see module docstring)."""
    skips: SkippedSteps = ctx.skipped_steps
    reason = skips.stop_reason(last_step=last_step)
    if reason is None:
        return
    shown = skips.in_a_row[-5:]
    listed = "; ".join(f"step {step}: {why}" for step, why in shown)
    earlier = f"{len(skips.in_a_row) - len(shown)} earlier; " if len(skips.in_a_row) > len(shown) else ""
    first_bad = skips.in_a_row[0][0]
    kept = f"step {first_bad - 1}" if first_bad > 1 else "initialisation"
    setting = f"{skips.stage}.max_consecutive_skipped_steps"
    raise TrainingStopped(
        f"training stopped at step {skips.in_a_row[-1][0]}: {reason} ({earlier}{listed}); the weights are those after "
        f"{kept} (a skipped step changes nothing). A non-finite update means the learning rate is too large for "
        f"these weights: lower {skips.stage}.lr (now {skips.lr:g}) or raise {skips.stage}.warmup_steps; a non-finite "
        f"gradient norm means the weights already diverged or a batch is broken: check the training data, or resume "
        f"from an earlier checkpoint in {ctx.run_dir / 'checkpoints'} with a lower lr. Each step's record in "
        f"{ctx.run_dir / 'metrics.jsonl'} says why it was skipped ({setting} = 0 never stops for skips in a row)."
    )
