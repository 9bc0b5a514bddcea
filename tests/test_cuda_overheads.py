"""The CUDA-side workspaces in the plan (opdgraph.cuda_overheads): when they apply, their sizes, where they live.

What these protect: a GPU plan that leaves out the cuBLAS / flashinfer workspaces or the decode graphs' pool
under-predicts every measured step (the tiny pipeline by ~70 MB on an H200); a CPU plan that includes them
over-predicts; the mirrored constants drifting from the code that allocates them silently changes the sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from opdgraph import cuda_overheads
from opdgraph.cuda_overheads import stacked_qkv_bytes
from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.render import render_html, render_json, render_text

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
MIB = 1024 * 1024
OVERHEADS = ("cuda.cublas_workspace", "rollout.flashinfer", "rollout.decode_graph_pool")
# Sized for the path that runs on the target (FlashAttention with native GQA, the fused loss kernel, no fp32
# lm_head copies on CUDA; the plain-torch attention's S x S scores on CPU, in the activations and the no-grad
# forward workspaces): tests/test_saved_bytes.py measures both paths, tests/test_sizing.py pins the numbers.
DEVICE_PATH_BUFFERS = ("student_activations", "backward.workspace", "logit_chunk", "teacher_score.workspace",
                       "eval.workspace")


def _plan(pipeline: str, *overrides: str):
    return compile_plan(load_pipeline(PIPELINES / pipeline, list(overrides)))


def test_mirrored_constants_match_the_code_that_allocates():
    """The planner's copies of the flashinfer workspace size or the graph ladder would drift from the runtime's."""
    from opdgraph.kernels.flashinfer_attention import WORKSPACE_BYTES
    from opdgraph.rollout.cuda_graphs import MAX_GRAPH_BATCH_SIZE, batch_size_ladder

    assert cuda_overheads.FLASHINFER_FLOAT_WORKSPACE_BYTES == WORKSPACE_BYTES
    assert cuda_overheads.MAX_GRAPH_BATCH_SIZE == MAX_GRAPH_BATCH_SIZE
    for max_num_seqs in [*range(1, 70), 100, 127, 128, 129, 255, 256, 257, 1000]:
        assert cuda_overheads.decode_graph_batch_sizes(max_num_seqs) == len(batch_size_ladder(max_num_seqs))


@pytest.mark.parametrize("pipeline", ["qwen25_1b5_from_7b.toml", "tiny.toml", "qwen3_4b_from_14b.toml"])
def test_cuda_plan_adds_exactly_the_overheads_at_each_step(pipeline):
    """The overheads would be missing from some step's live bytes, counted twice, or change other buffers."""
    cpu = _plan(pipeline, "pipeline.device=cpu", "pipeline.fit.enabled=false")
    cuda = _plan(pipeline, "pipeline.device=cuda", "pipeline.fit.enabled=false")
    assert not set(OVERHEADS) & set(cpu.buffers)
    # The fused GPU rollout's stacked q/k/v copy lives with the KV pool: only that buffer grows, by exactly it.
    stacked = cuda.buffers["rollout.kv_cache"].bytes - cpu.buffers["rollout.kv_cache"].bytes
    assert stacked == stacked_qkv_bytes(load_pipeline(PIPELINES / pipeline, ["pipeline.device=cuda"]))
    skipped = (*OVERHEADS, *DEVICE_PATH_BUFFERS, "rollout.kv_cache")
    others = {name: b for name, b in cuda.buffers.items() if name not in skipped}
    assert others == {name: b for name, b in cpu.buffers.items() if name not in skipped}
    live = cuda.live_buffers()
    for index, (on_cpu, on_cuda) in enumerate(zip(cpu.steps, cuda.steps)):
        extra = sum(cuda.buffers[name].bytes for name in OVERHEADS if name in live[index])
        extra += stacked if "rollout.kv_cache" in live[index] else 0
        extra += sum(cuda.buffers[name].bytes - cpu.buffers[name].bytes for name in DEVICE_PATH_BUFFERS
                     if name in live[index])
        assert on_cuda.live_bytes - on_cpu.live_bytes == extra
    if "rollout.decode_graph_pool" in cuda.buffers:
        assert [i for i, names in enumerate(live) if "rollout.decode_graph_pool" in names] == \
            [[s.name for s in cuda.steps].index("rollout.decode")]


def test_sizes_of_the_qwen_rollout_path():
    """Hand-computed sizes for Qwen2.5-1.5B bf16, 128 concurrent sequences (graphs for 1, 2, ..., 128)."""
    plan = _plan("qwen25_1b5_from_7b.toml")
    assert plan.buffers["cuda.cublas_workspace"].bytes == 4 * 32 * MIB
    # Decode bursts replay their own graphs: flashinfer keeps only its prefill and eager-decode wrappers.
    assert plan.buffers["rollout.flashinfer"].bytes == 128 * MIB + 2 * 8 * MIB
    per_step_graphs = _plan("qwen25_1b5_from_7b.toml", "rollout.decode_burst_steps=1")
    assert per_step_graphs.buffers["rollout.flashinfer"].bytes == 128 * MIB + (2 + 8) * 8 * MIB
    hidden, q, kv, intermediate, head_dim, vocab = 1536, 1536, 256, 8960, 128, 151936
    stacked_qkv = 28 * (q + 2 * kv) * (hidden + 1) * 2  # Qwen2 has q/k/v biases
    assert stacked_qkv_bytes(load_pipeline(PIPELINES / "qwen25_1b5_from_7b.toml", [])) == stacked_qkv
    # one decode step's no-grad forward peak (inside an MLP, and the one RoPE table pair of 2 x head_dim:
    # sizing.forward_workspace_bytes) and fp32 logits
    per_token = (4 * hidden + 3 * intermediate + 2 * head_dim) * 2 + vocab * 4
    assert plan.buffers["rollout.decode_graph_pool"].bytes == 128 * per_token


@pytest.mark.parametrize("overrides, expected", [
    (("pipeline.device=auto",), set(OVERHEADS)),
    (("pipeline.device=cpu",), set()),
    (("rollout.backend=torch",), {"cuda.cublas_workspace"}),
    (("models.student.dtype=float32", "models.teacher.dtype=float32"), {"cuda.cublas_workspace"}),
])
def test_which_overheads_apply(overrides, expected):
    """Workspaces of a path the run does not take would be planned, or those of one it takes left out."""
    plan = _plan("qwen25_1b5_from_7b.toml", *overrides)
    assert set(OVERHEADS) & set(plan.buffers) == expected
    pairs = 4 if "rollout.flashinfer" in expected else 2
    if expected:
        assert plan.buffers["cuda.cublas_workspace"].bytes == pairs * 32 * MIB


def test_every_renderer_shows_the_formulas():
    """A reader of the text, JSON or HTML plan would not see where the workspace bytes come from."""
    plan = _plan("qwen25_1b5_from_7b.toml")
    for name in OVERHEADS:
        formula = plan.buffers[name].formula
        assert formula
        assert name in render_text(plan) and name in render_html(plan)
        assert formula in render_json(plan) and formula.split(":")[0] in render_html(plan)


@pytest.mark.parametrize("setting, step", [("auto", "4 K x c x d"), ("torch", "4 Hv x k_d x v_d x 4")])
def test_decode_graph_pool_formula_names_the_linear_attention_step(monkeypatch, setting, step):
    """A reader of a Qwen3.5 plan would see a decode-graph pool formula with only the MLP in it, while its size is
    the larger of the MLP's and a linear-attention layer's decode step (sizing.decode_step_workspace_bytes) in the
    core the plan sizes; or the pool would not list OPDGRAPH_LINEAR_ATTENTION among what sized it."""
    from opdgraph.planned_paths import LINEAR_CORE_ENVIRONMENT

    monkeypatch.setenv(LINEAR_CORE_ENVIRONMENT, setting)
    pool = _plan("qwen35_0b8_from_4b.toml", "pipeline.device=cuda").buffers["rollout.decode_graph_pool"]
    assert "(4 h + 3 i) x d + t (t = 2 x rotary_dim x RoPE kinds x d)" in pool.formula and step in pool.formula
    assert LINEAR_CORE_ENVIRONMENT in pool.sized_by
    plain = _plan("qwen25_1b5_from_7b.toml").buffers["rollout.decode_graph_pool"]
    assert "largest graph batch (128) x ((4 h + 3 i) x d + t (t = 2 x rotary_dim x RoPE kinds x d) + V x 4): " in plain.formula
    assert LINEAR_CORE_ENVIRONMENT not in plain.sized_by
