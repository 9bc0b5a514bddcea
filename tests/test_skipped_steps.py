"""Skipped optimizer steps: when they stop a run (TrainingStopped, exit 2), and the run that is stopped.

The end-to-end case gives the tiny pipeline a learning rate whose AdamW step size overflows fp32 (finite in the
config, so it is the update check that must catch it): every step's update is non-finite and rolled back, and the
third one in a row stops the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opdgraph.errors import TrainingStopped
from opdgraph.runtime.skipped_steps import NON_FINITE_GRADIENT, NON_FINITE_UPDATE, SkippedSteps, stop_if_stuck

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
OK, GRAD, UPDATE = None, NON_FINITE_GRADIENT, NON_FINITE_UPDATE

# (outcomes of steps 1..n, max_consecutive_skipped_steps, the step the run stops at or None, text of the reason)
CASES = [
    ([UPDATE, UPDATE, UPDATE], 3, 3, "3 optimizer steps in a row were skipped"),
    ([OK, GRAD, UPDATE, GRAD], 3, 4, "3 optimizer steps in a row were skipped"),
    ([GRAD, OK, GRAD, GRAD, OK], 3, None, None),  # a step in between was applied
    ([UPDATE, UPDATE, OK], 2, 2, "2 optimizer steps in a row"),
    ([GRAD, GRAD], 3, 2, "all 2 optimizer steps of this run were skipped"),  # the run ends before the limit
    ([UPDATE] * 5, 0, 5, "all 5 optimizer steps of this run were skipped"),  # 0: never for skips in a row
    ([OK, GRAD, GRAD, GRAD], 0, None, None),
]


@pytest.mark.parametrize("outcomes, limit, stops_at, reason", CASES)
def test_when_skipped_steps_stop_the_run(tmp_path, outcomes, limit, stops_at, reason):
    """If this fails, a run with too many skipped steps in a row (or none applied at all) goes on or ends as a
    success, one that recovered is stopped, or the message stops naming the steps, their reasons, the setting to
    change and where the records are."""
    config = SimpleNamespace(max_consecutive_skipped_steps=limit, lr=5e-3)
    ctx = SimpleNamespace(skipped_steps=SkippedSteps(), run_dir=tmp_path)
    stopped = None
    for step, outcome in enumerate(outcomes, start=1):
        ctx.skipped_steps.record(step, outcome, config, "optimizer")
        try:
            stop_if_stuck(ctx, last_step=step == len(outcomes))
        except TrainingStopped as error:
            stopped = (step, str(error))
            break
    if stops_at is None:
        assert stopped is None
        return
    step, message = stopped
    assert step == stops_at and reason in message
    assert f"training stopped at step {stops_at}" in message
    assert f"step {stops_at}: {outcomes[stops_at - 1]}" in message
    assert "lower optimizer.lr (now 0.005)" in message and "optimizer.max_consecutive_skipped_steps = 0" in message
    assert str(tmp_path / "metrics.jsonl") in message


def test_cli_stops_a_run_whose_updates_are_all_non_finite(tmp_path, capsys, monkeypatch):
    """lr = 1e38 makes every AdamW step size overflow fp32: each step must be rolled back (the weights and moments
    stay those of initialisation, bit for bit), logged as `skipped: "non-finite update"`, and the third in a row
    must stop the run with exit 2 and a message, not exit 0 with a broken (or untrained) model."""
    from opdgraph.cli import main
    from opdgraph.runtime import run as run_module

    stopped = {}

    def recording_stop(ctx, *, last_step):
        stopped["ctx"] = ctx
        stop_if_stuck(ctx, last_step=last_step)

    monkeypatch.setattr(run_module, "stop_if_stuck", recording_stop)
    run_dir = tmp_path / "run"
    overrides = [f"pipeline.output_dir={run_dir}", "pipeline.device=cpu", "log.progress=false",
                 "step.lr=1e38", "step.warmup_steps=0", "data.prompts_per_step=2",
                 "rollout.max_new_tokens=6", "eval.num_prompts=1", "eval.max_new_tokens=2"]
    code = main(["run", str(TINY), *[arg for value in overrides for arg in ("--set", value)]])
    err = capsys.readouterr().err
    assert code == 2
    assert "training stopped at step 3: 3 optimizer steps in a row were skipped" in err
    assert "step 1: non-finite update; step 2: non-finite update; step 3: non-finite update" in err
    assert "lower step.lr (now 1e+38)" in err and "Traceback" not in err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["step"], r["skipped"]) for r in train] == [(1, UPDATE), (2, UPDATE), (3, UPDATE)]
    assert all(r["grad_norm"] is not None for r in train)  # the gradients were fine; the update was not

    from opdgraph.config import load_pipeline
    from opdgraph.runtime.model_loading import load_models

    ctx = stopped["ctx"]
    cfg = load_pipeline(TINY, [])
    initial, _ = load_models({"student": cfg.models["student"]}, Path(cfg.base_dir), torch.device("cpu"))["student"]
    for (name, param), (_, fresh) in zip(ctx.student.named_parameters(), initial.named_parameters()):
        assert torch.equal(param, fresh), name
    assert all(count == 0 for count in ctx.optimizer.steps.values())
    assert all(not moment.any() for moment in (*ctx.optimizer.exp_avg.values(), *ctx.optimizer.exp_avg_sq.values()))


@pytest.mark.parametrize("before, after, stops_at", [
    ([UPDATE, UPDATE], [UPDATE], 3),  # a streak cut by the resume still counts as one
    ([OK, GRAD], [GRAD], None),  # applied before the resume: not "all skipped" after it
])
def test_skip_counts_survive_a_resume(tmp_path, before, after, stops_at):
    """If this fails, a resumed run stops (or fails to stop) differently from an uninterrupted one: the counts are
    not carried in the checkpoint's trainer state, which run.trainer_state writes and run.restore reads."""
    from opdgraph.runtime.run_checkpoints import restore, trainer_state

    config = SimpleNamespace(max_consecutive_skipped_steps=3, lr=1.0)
    stub = SimpleNamespace(state_dict=dict, load_state_dict=lambda state: None)
    first = SimpleNamespace(step=len(before), optimizer=stub, sampler=stub, skipped_steps=SkippedSteps())
    for step, outcome in enumerate(before, start=1):
        first.skipped_steps.record(step, outcome, config, "step")
    checkpoint = tmp_path / "step"
    checkpoint.mkdir()
    torch.save(trainer_state(first), checkpoint / "trainer.pt")
    resumed = SimpleNamespace(optimizer=stub, sampler=stub, skipped_steps=SkippedSteps(), run_dir=tmp_path)
    restore(resumed, checkpoint)
    stopped = None
    for step, outcome in enumerate(after, start=len(before) + 1):
        resumed.skipped_steps.record(step, outcome, config, "step")
        try:
            stop_if_stuck(resumed, last_step=step == len(before) + len(after))
        except TrainingStopped:
            stopped = step
    assert stopped == stops_at
