"""Compiled plans of the shipped pipelines: goldens (text and json), memory invariants, fusion, facts and HTML.

Goldens are regenerated with OPDGRAPH_REGEN_GOLDEN=1 (tests/golden_helpers.py) from the planner's own output, so a
regenerated golden checks nothing by itself: the buffer sizes in it are checked by tests/test_saved_bytes.py and
tests/test_sizing.py, and a golden changes only together with them.
"""

from __future__ import annotations

import pathlib
import xml.dom.minidom

import pytest

from golden_helpers import check_golden
from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.render import render_html, render_json, render_text

PIPELINES = pathlib.Path(__file__).parent.parent / "pipelines"
SMOLLM_JSON = "models.teacher.path=pkg:opdgraph/model_configs/smollm2-135m-instruct.json"
CASES = {  # golden name -> (pipeline, overrides); demo uses the shipped SmolLM2 json so no optional wheel is needed
    "tiny": ("tiny.toml", []),
    "qwen25_1b5_from_7b": ("qwen25_1b5_from_7b.toml", []),
    "qwen25_1b5_from_7b_unfused": ("qwen25_1b5_from_7b.toml", ["pipeline.fuse_training=false"]),
    "demo": ("demo.toml", ["models.student.path=pkg:opdgraph/model_configs/smollm2-135m-instruct.json"]),
    "prune_distill": ("prune_distill.toml", [SMOLLM_JSON]),
    "tiny_hybrid": ("tiny_hybrid.toml", []),
}


def plan_for(name, extra=()):
    pipeline, overrides = CASES[name]
    return compile_plan(load_pipeline(str(PIPELINES / pipeline), [*overrides, *extra]))


@pytest.mark.parametrize("name", list(CASES))
def test_plan_goldens(name):
    """If this fails, the plan of a shipped pipeline changed: review tests/golden/plan_<name>.* diffs."""
    plan = plan_for(name)
    check_golden(f"plan_{name}.txt", render_text(plan))
    check_golden(f"plan_{name}.json", render_json(plan))


@pytest.mark.parametrize("name", list(CASES))
def test_plan_memory_invariants(name):
    """If this fails, a step touches a buffer that is not on the device, a transient buffer is not freed exactly
    once, or live bytes / the peak disagree with a brute-force sum over live buffers."""
    plan = plan_for(name)
    live = plan.live_buffers()
    freed = {}
    for index, step in enumerate(plan.steps):
        for buffer in (*step.reads, *step.writes):
            assert buffer in live[index], f"{step.name} touches {buffer} which is not live"
        assert step.live_bytes == sum(plan.buffers[buffer].bytes for buffer in live[index])
        for release in step.releases:
            freed[release.buffer] = freed.get(release.buffer, 0) + 1
    for buffer in plan.buffers.values():
        touched = any(buffer.name in (*step.reads, *step.writes) for step in plan.steps)
        if buffer.lifetime == "transient" and touched:
            assert freed.get(buffer.name) == 1, buffer.name
    assert plan.peak_bytes == max(step.live_bytes for step in plan.steps)


@pytest.mark.parametrize("name", list(CASES))
def test_kv_cache_never_meets_gradients(name):
    """If this fails, gradient buffers are allocated while the rollout KV pool is still on the device."""
    plan = plan_for(name)
    for names in plan.live_buffers():
        assert not ("rollout.kv_cache" in names and "student.grads" in names)


def test_fusion_lowers_peak_and_scopes():
    """If this fails, fusion no longer keeps teacher hidden states per micro-batch and logits per chunk."""
    fused, unfused = plan_for("qwen25_1b5_from_7b"), plan_for("qwen25_1b5_from_7b_unfused")
    assert fused.peak_bytes < unfused.peak_bytes
    assert unfused.buffers["teacher_hidden"].bytes == \
        fused.buffers["teacher_hidden"].bytes * fused.facts["train.tokens_per_step"] // \
        fused.facts["train.micro_batch_tokens"]
    fused_steps = {step.name: step for step in fused.steps}
    assert fused_steps["loss"].scope == "chunk" and fused_steps["teacher_score"].scope == "micro_batch"
    assert {step.fused_group for step in fused.steps if step.kind in ("teacher_score", "loss", "backward")} == \
        {"train_micro_batch"}
    # teacher hidden states are freed inside the micro-batch loop (after the loss), before backward
    assert any(release.buffer == "teacher_hidden" for release in fused_steps["loss"].releases)
    assert all(step.fused_group is None for step in unfused.steps)


def test_plan_facts():
    """If this fails, facts the runtime reads (KV pages, page size, shapes) are missing or wrong."""
    plan = plan_for("qwen25_1b5_from_7b")
    # 128 sequences x ceil(1536 / 16) pages; micro-batches hold floor(8192 / 1536) = 5 sequences -> 26 of them
    assert plan.facts["rollout.num_pages"] == 128 * 96 and plan.facts["rollout.page_size"] == 16
    assert plan.facts["train.num_micro_batches"] == 26 and plan.facts["train.micro_batch_tokens"] == 5 * 1536
    assert plan.facts["models.student.layers"] == 28 and plan.facts["models.teacher.vocab"] == 152064
    assert [step.name for step in plan.steps][:3] == ["data.load", "rollout.prefill", "rollout.decode"]


def test_offloaded_teacher_is_reloaded_before_use():
    """If this fails, offload_when_idle no longer moves the teacher out during rollout and back for scoring, or it
    moves it once per micro-batch (it must stay on the device for the whole training loop: reloaded once)."""
    plan = plan_for("qwen25_1b5_from_7b", ["models.teacher.offload_when_idle=true"])
    steps = {step.name: step for step in plan.steps}
    assert "teacher.weights" in steps["teacher_score"].reloads
    assert any(release.buffer == "teacher.weights" and release.action == "offload"
               for release in steps["backward"].releases)
    assert "teacher.weights" not in plan.live_buffers()[1]  # not on the device during prefill
    assert steps["teacher_score"].work.pcie_bytes >= plan.buffers["teacher.weights"].bytes


def test_activation_checkpointing_shrinks_activations():
    """If this fails, backward.activation_checkpointing stops changing the activation buffer size."""
    base, checkpointed = plan_for("tiny"), plan_for("tiny", ["backward.activation_checkpointing=true"])
    assert checkpointed.buffers["student_activations"].bytes < base.buffers["student_activations"].bytes


def test_html_is_self_contained_and_well_formed():
    """If this fails, the HTML report references the network or is not well-formed markup."""
    html = render_html(plan_for("qwen25_1b5_from_7b"))
    assert "<script src" not in html and "<link" not in html and "https://" not in html
    body = html[html.index("<body>"):html.index("</html>")]
    xml.dom.minidom.parseString(body.replace("<body>", "<body>", 1))
    assert html.count("<title>") > 20  # tooltips
