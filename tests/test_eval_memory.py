"""The eval stage's memory is planned and the runtime allocates exactly that: its KV pools (student and teacher),
sized by the plan's eval facts, allocated at the eval step and freed after it; and eval lengths that would not fit
are config errors, not run-time surprises."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from opdgraph.compile import compile_plan
from opdgraph.config import ConfigError, load_pipeline
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.run import run_pipeline

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
# tiny.toml's shapes: (layers, kv heads x head_dim); both models float32.
STUDENT_KV, TEACHER_KV = (2, 2 * 64 // 4), (3, 2 * 96 // 4)
EVAL_OVERRIDES = ("eval.num_prompts=3", "eval.max_new_tokens=40", "rollout.page_size=8")


def _pool_bytes(layers_kv, pages: int, page_size: int) -> int:
    layers, kv = layers_kv
    return pages * page_size * layers * 2 * kv * 4


@pytest.mark.parametrize("world_size", [1, 2])
def test_plan_allocates_eval_pools_and_workspace_at_eval_and_frees_them_after(world_size):
    """The plan would miss memory eval really takes (the teacher's pool, the workspace, a sharded student's gathered
    weights) or size the pools unlike the runtime, so an eval could push a run past the budget it was planned in."""
    plan = compile_plan(load_pipeline(TINY, list(EVAL_OVERRIDES)), world_size=world_size)
    pages = 3 * math.ceil((64 + 40) / 8)  # min(num_prompts, max_num_seqs) x pages of one whole sequence
    assert plan.facts["eval.num_pages"] == pages and plan.facts["eval.concurrent_seqs"] == 3
    assert plan.buffers["eval.kv_cache"].bytes == _pool_bytes(STUDENT_KV, pages, 8)
    assert plan.buffers["eval.teacher_kv_cache"].bytes == _pool_bytes(TEACHER_KV, pages, 8)
    expected = {"eval.kv_cache", "eval.teacher_kv_cache", "eval.workspace"}
    if world_size > 1:
        expected.add("eval.gathered_weights")
    step = plan.step("eval")
    assert set(step.allocates) == expected and {r.buffer for r in step.releases} == expected
    assert all(plan.buffers[name].formula and plan.buffers[name].bytes > 0 for name in expected)
    # Live bytes at eval count them: held buffers plus eval's own.
    held = sum(b.bytes for b in plan.buffers.values() if b.lifetime == "held" and b.device == "device")
    assert step.live_bytes == held + sum(plan.buffers[name].bytes for name in expected)
    # Scoring micro-batches hold whole eval sequences (a longer one would be refused at run time).
    assert plan.facts["eval.micro_batch_tokens"] % (64 + 40) == 0
    assert 64 + 40 <= plan.facts["eval.micro_batch_tokens"] <= 512


def test_runtime_allocates_the_planned_eval_pools_and_releases_them(tmp_path, monkeypatch):
    """The runtime would allocate eval pools of another size than the plan says (e.g. the rollout engine's), or keep
    them after eval (debug_memory proves the release freed them)."""
    seen: dict[str, list[int]] = {}
    original_put = BufferTable.put

    def recording_put(self, name, value):
        if name.startswith("eval."):
            seen.setdefault(name, []).append(sum(t.numel() * t.element_size() for t in value))
        original_put(self, name, value)

    monkeypatch.setattr(BufferTable, "put", recording_put)
    cfg = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path / 'run'}", "pipeline.num_steps=1", "pipeline.device=cpu",
                               "log.progress=false", "pipeline.debug_memory=true",
                               "data.prompts_per_step=2", "rollout.max_new_tokens=8", *EVAL_OVERRIDES])
    plan = compile_plan(cfg)
    ctx = run_pipeline(cfg, plan)
    for name in ("eval.kv_cache", "eval.teacher_kv_cache"):
        assert seen[name] == [plan.buffers[name].bytes] * 2  # the eval before training and the final one
        assert ctx.buffers.released.count(name) == 2 and not ctx.buffers.has(name)
    assert all(engine.kv_cache is None for engine in ctx.eval_engines.values())
    assert [r["label"] for r in ctx.eval_records] == ["before", "final"]


def test_eval_longer_than_a_scoring_micro_batch_is_a_config_error():
    """An eval response that cannot be scored whole would fail after generating (or be cut); the config must name
    eval.max_new_tokens and the value that fits."""
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens.*at most 448"):
        load_pipeline(TINY, ["eval.max_new_tokens=449", "models.student.config.max_position_embeddings=1024",
                             "models.teacher.config.max_position_embeddings=1024"])
    load_pipeline(TINY, ["eval.max_new_tokens=448"])
