"""`pipeline.release_phase_buffers = false`: the plan without its releases between rollout and training.

What the lifetime analysis buys is measured by running the same pipeline with the KV pool kept through training and
the gradients kept through rollout (benchmarks/step.py --releases-off-compare). These tests check that the plan
predicts exactly that (every step's live bytes grow by the two buffers where the normal plan has them released) and
that the runtime obeys it without changing the training result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.runtime.run import run_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
KEPT = ("rollout.kv_cache", "student.grads")


def _plans(pipeline: str, *overrides: str):
    path = PIPELINES / pipeline
    released = compile_plan(load_pipeline(path, list(overrides)))
    kept = compile_plan(load_pipeline(path, [*overrides, "pipeline.release_phase_buffers=false"]))
    return released, kept


@pytest.mark.parametrize("pipeline, overrides", [
    ("qwen25_1b5_from_7b.toml", ()), ("qwen25_1b5_from_7b.toml", ("pipeline.fuse_training=false",)),
    ("tiny.toml", ()),
])
def test_kept_buffers_add_exactly_their_bytes_where_the_plan_released_them(pipeline, overrides):
    """The switch would change more than the two buffers' lifetimes, or the prediction would not count them."""
    released, kept = _plans(pipeline, *overrides)
    assert [s.name for s in released.steps] == [s.name for s in kept.steps]
    live_released = released.live_buffers()
    for index, (normal, without) in enumerate(zip(released.steps, kept.steps)):
        missing = [name for name in KEPT if name not in live_released[index]]
        assert without.live_bytes - normal.live_bytes == sum(kept.buffers[name].bytes for name in missing)
        assert not {r.buffer for r in without.releases} & set(KEPT)
    assert kept.peak_bytes == max(step.live_bytes for step in kept.steps)
    assert all(kept.buffers[name].lifetime == "held" for name in KEPT)


def test_peak_rises_by_the_kv_pool_and_rollout_by_the_gradients():
    """The comparison's headline numbers: the peak (loss, gradients already live) gains the KV pool; rollout, where
    the KV pool lives, gains the gradients."""
    released, kept = _plans("qwen25_1b5_from_7b.toml")
    kv, grads = (released.buffers[name].bytes for name in KEPT)
    assert released.peak.step == kept.peak.step == "loss"
    assert kept.peak_bytes - released.peak_bytes == kv
    decode = "rollout.decode"
    assert kept.step(decode).live_bytes - released.step(decode).live_bytes == grads


def _run(tmp_path: Path, name: str, *overrides: str):
    cfg = load_pipeline(PIPELINES / "tiny.toml", [
        f"pipeline.output_dir={tmp_path / name}", "pipeline.num_steps=2", "pipeline.device=cpu", "data.prompts_per_step=4",
        "log.progress=false", "eval.num_prompts=2", "eval.max_new_tokens=4",
        "rollout.max_new_tokens=8", *overrides])
    return run_pipeline(cfg, compile_plan(cfg))


def test_runtime_keeps_both_buffers_and_trains_identically(tmp_path):
    """Kept gradients would accumulate across steps (a different update), the runtime would still free the KV pool
    or the gradients although the plan keeps them, or the unfused plan (the comparison's third variant) would not
    run or would train differently."""
    normal = _run(tmp_path, "released")
    kept = _run(tmp_path, "kept", "pipeline.release_phase_buffers=false", "pipeline.debug_memory=true")
    unfused = _run(tmp_path, "unfused", "pipeline.release_phase_buffers=false", "pipeline.fuse_training=false")
    assert kept.engine.kv_cache is not None and normal.engine.kv_cache is None
    assert not set(KEPT) & set(kept.buffers.released)
    grads = [p.grad for p in kept.student.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    for run in (kept, unfused):
        for (name, a), (_, b) in zip(normal.student.named_parameters(), run.student.named_parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
