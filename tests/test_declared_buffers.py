"""A stage call sees only the plan buffers its steps declare (opdgraph.runtime.declared_buffers): the runtime's
buffer accesses are the plan's reads and writes, or the run fails naming the stage and the buffer."""

from __future__ import annotations

from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.runtime import training
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.declared_buffers import DeclaredBuffers, UndeclaredBufferError, declared_by_stage

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def test_a_stage_may_touch_only_what_its_steps_declare():
    plan = compile_plan(load_pipeline(PIPELINES / "tiny.toml"))
    declared = declared_by_stage(plan)
    assert {"student_hidden", "teacher_hidden", "hidden_grad", "logit_chunk"} <= declared["loss"]
    assert "prompts" not in declared["loss"] and "rollout.kv_cache" in declared["rollout"]
    table = BufferTable()
    table.put("prompts", [1, 2])
    view = DeclaredBuffers(table, "loss", declared["loss"])
    view.put_item("teacher_hidden", 0, "hidden")
    assert table.get_item("teacher_hidden", 0) == "hidden"
    with pytest.raises(UndeclaredBufferError, match=r"\[loss\] touched buffer 'prompts'"):
        view.get("prompts")


def test_an_undeclared_access_in_a_real_step_fails(tmp_path, monkeypatch):
    from tests.training_harness import context, random_samples, run_step

    cfg, plan, ctx = context(tmp_path, "tiny.toml")
    scoring = training.teacher_score

    def peeking_teacher(inputs):
        inputs.values.get("prompts")  # not a read of teacher_score's plan step
        scoring(inputs)

    monkeypatch.setattr(training, "teacher_score", peeking_teacher)
    with pytest.raises(UndeclaredBufferError, match=r"\[teacher_score\] touched buffer 'prompts'"):
        run_step(cfg, plan, ctx, random_samples(4, [None]), monkeypatch)
