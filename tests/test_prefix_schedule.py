"""The gold-prefix schedule (opdgraph.train.prefix_schedule) as a table, and a hybrid run that resumes exactly.

The table's k values are worked out by hand from k = min(floor(f(s) x max_tokens), floor(f(s) x fraction x L)).
The run: pipelines/tiny_hybrid.toml with the prefix decaying to nothing over 3 steps, killed after its step-2
checkpoint and resumed, must log every step's prefix tokens, cross-entropy and loss exactly as an uninterrupted run
does (the prefix of a step depends on the step alone, which the checkpoint restores). Its evals report the accuracy
with the full gold prefix beside the one without.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.runtime import executor as executor_module
from opdgraph.runtime.run import run_pipeline
from opdgraph.train.prefix_schedule import PrefixSchedule

HYBRID = Path(__file__).resolve().parents[1] / "pipelines" / "tiny_hybrid.toml"

# (max_tokens, fraction, schedule, decay_steps, gold_tokens, step) -> k
TABLE = [
    (24, 1.0, "constant", 0, 70, 0, 24),   # the token limit
    (24, 1.0, "constant", 0, 10, 99, 10),  # a gold shorter than the limit: all of it, at any step
    (24, 0.5, "constant", 0, 30, 5, 15),   # half of 30
    (24, 0.5, "constant", 0, 31, 5, 15),   # floor(15.5)
    (10, 0.3, "constant", 0, 10, 0, 3),    # 0.3 x 10 is 3 exactly (a float product would floor to 2)
    (24, 1.0, "linear", 4, 70, 0, 24),     # f = 1
    (24, 1.0, "linear", 4, 70, 1, 18),     # f = 3/4
    (24, 1.0, "linear", 4, 70, 3, 6),      # f = 1/4
    (24, 1.0, "linear", 4, 70, 4, 0),      # gone at the end of the decay ...
    (24, 1.0, "linear", 4, 70, 9, 0),      # ... and after it
    (24, 0.5, "linear", 3, 30, 1, 10),     # min(floor(2/3 x 24) = 16, floor(2/3 x 15) = 10)
    (7, 1.0, "linear", 3, 70, 2, 2),       # floor(7 / 3)
]


@pytest.mark.parametrize("max_tokens, fraction, schedule, decay_steps, gold, step, expected", TABLE)
def test_prefix_tokens_table(max_tokens, fraction, schedule, decay_steps, gold, step, expected):
    """Fails if the schedule's factor, the token limit, the fraction or their rounding is off."""
    rule = PrefixSchedule(max_tokens=max_tokens, fraction=fraction, schedule=schedule, decay_steps=decay_steps)
    assert rule.tokens(gold, step) == expected


def _run(run_dir: Path, resume: Path | None = None):
    cfg = load_pipeline(HYBRID, [f"pipeline.output_dir={run_dir}", "log.progress=false", "pipeline.device=cpu",
                                 "pipeline.num_steps=4", "sft.decay_steps=3", "checkpoint.every_n_steps=2",
                                 "rollout.max_new_tokens=8",
                                 "eval.every_n_steps=0", "eval.num_prompts=2"])
    return run_pipeline(cfg, compile_plan(cfg), resume=resume)


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if record["kind"] == kind]


def _train_records(run_dir: Path) -> list[dict]:
    keys = ("step", "gold_prefix_tokens", "gold_prefix_length_mean", "sft_loss", "sft_cross_entropy", "loss",
            "divergence", "grad_norm")
    return [{key: record[key] for key in keys} for record in _records(run_dir, "train")]


def test_hybrid_run_resumes_with_the_same_prefixes(tmp_path, monkeypatch):
    """Fails if a resumed run places other prefixes than the uninterrupted one (a schedule driven by anything but
    the restored step), or if the prefix does not decay to nothing as configured."""
    full = _train_records(_run(tmp_path / "full").run_dir)
    tokens = [record["gold_prefix_tokens"] for record in full]
    # 16 sequences whose golds are over 48 tokens long: 24, then 2/3, 1/3 of it, then none
    assert tokens == [16 * 24, 16 * 16, 16 * 8, 0]
    assert full[3]["sft_loss"] == 0.0 and full[0]["sft_loss"] > 0
    evals = _records(tmp_path / "full", "eval")
    assert [record["label"] for record in evals] == ["before", "final"]
    assert all("accuracy" in record and "accuracy_with_gold_prefix" in record
               and record["gold_prefix_length_mean"] == 24 and 0 < record["gold_prefix_share_mean"] <= 0.5
               and record["gold_prefix_graded"] == record["num_prompts"] for record in evals)
    original = executor_module.PlanExecutor.run_training_step

    def killed_at_step_3(self):
        if self.ctx.step == 3:
            raise KeyboardInterrupt("simulated kill")
        original(self)

    monkeypatch.setattr(executor_module.PlanExecutor, "run_training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed")
    monkeypatch.setattr(executor_module.PlanExecutor, "run_training_step", original)
    _run(tmp_path / "killed", resume=tmp_path / "killed")
    assert _train_records(tmp_path / "killed") == full
