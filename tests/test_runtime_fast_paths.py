"""CPU checks of the runtime's GPU-path choices (context.py) and of the sync-free micro-batch loop (training.py).

The GPU paths themselves (flashinfer rollout, FlashAttention varlen) run in the GPU tests; here: what CPU runs
select, the error for an impossible explicit choice, and that the micro-batch loop never reads a value back to the
host (each read-back would stall a GPU once per micro-batch).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.errors import DeviceError
from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.runtime.engine_setup import rollout_attention, use_packed_attention
from opdgraph.runtime.executor import PlanExecutor
from opdgraph.runtime.build import build_context

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny.toml"
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def test_rollout_attention_choices_on_cpu():
    """'auto' must fall back to the torch engine off CUDA; an explicit 'flashinfer' there is a clear error."""
    cpu = torch.device("cpu")
    assert rollout_attention("auto", cpu, torch.bfloat16) == "torch"
    from opdgraph import cuda_overheads
    from opdgraph.runtime import engine_setup as context

    assert cuda_overheads.FLASHINFER_HEAD_DIMS == context.FLASHINFER_HEAD_DIMS
    if torch.cuda.is_available():  # head sizes flashinfer's kernels lack go to the torch path on CUDA too
        assert rollout_attention("auto", torch.device("cuda"), torch.bfloat16, head_dim=16) == "torch"
    assert rollout_attention("torch", cpu, torch.bfloat16) == "torch"
    with pytest.raises(DeviceError, match="rollout.backend = 'flashinfer' but the run is on cpu"):
        rollout_attention("flashinfer", cpu, torch.bfloat16)


class SegmentMaskBackend(TorchReferenceBackend):
    """Packed attention with the sequence mask built on the device (no cu_seqlens read-back), like the flash
    kernel on GPU: lets the loop be checked for host reads on CPU. Dense [T, T] scores: tiny inputs only."""

    def packed(self, q, k, v, meta, *, scale, sliding_window):
        tokens = torch.arange(q.shape[0], device=q.device)
        segment = torch.searchsorted(meta.cu_seqlens[1:].long(), tokens, right=True)
        visible = (segment[:, None] == segment[None, :]) & (tokens[None, :] <= tokens[:, None])
        group = q.shape[1] // k.shape[1]
        keys = k.repeat_interleave(group, dim=1).transpose(0, 1)
        values = v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q.transpose(0, 1) @ keys.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ values).transpose(0, 1)


def test_micro_batch_loop_reads_nothing_back_to_the_host(tmp_path, monkeypatch):
    """teacher_score, the student forward, the loss and the backward must queue work without reading any tensor
    back (float(loss), .item(), .tolist(), a tensor in an `if`); the step's scalars are read once, after the loop."""
    cfg = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path}", "log.progress=false",
                               "data.prompts_per_step=3", "rollout.max_new_tokens=6",
                               "teacher_score.micro_batch_tokens=128"])
    plan = compile_plan(cfg)
    ctx = build_context(cfg, plan, tmp_path)
    print(use_packed_attention([ctx.student, ctx.teacher], ctx.device))
    for model in (ctx.student, ctx.teacher):
        model.set_attention_backend(SegmentMaskBackend())
    hooks = {"rollout.kv_cache": ctx.engine.release, ctx.facts["grads_buffer"]: ctx.optimizer.zero_grad}
    executor = PlanExecutor(plan, {name: stage.config for name, stage in cfg.stages.items()}, ctx,
                            release_hooks=hooks)
    loop_ran = []
    original_run_loop = executor._run_loop

    def guarded_run_loop(steps):
        def refuse(*args, **kwargs):
            raise AssertionError("host read-back inside the micro-batch loop")

        with monkeypatch.context() as guard:
            for name in HOST_READS:
                guard.setattr(torch.Tensor, name, refuse)
            original_run_loop(steps)
        loop_ran.append([step.name for step in steps])

    executor._run_loop = guarded_run_loop
    executor.run_training_step()
    assert loop_ran and {"teacher_score", "loss", "backward"} <= set(loop_ran[0])
    record = ctx.step_record
    assert isinstance(record["loss"], float) and isinstance(record["divergence"], float)
    assert record["loss"] > 0 and record["grad_norm"] > 0


def test_explicit_bursts_on_cuda_need_the_kernels_head_sizes():
    """An explicit decode_burst_steps > 1 on CUDA runs the Triton decode kernel even with torch attention; a head
    size it cannot take must be refused with the key named, not fail inside Triton at the first burst (review)."""
    from types import SimpleNamespace

    from opdgraph.runtime.engine_setup import decode_burst_steps

    heads96 = SimpleNamespace(num_heads=8, num_kv_heads=2, head_dim=96)
    heads128 = SimpleNamespace(num_heads=8, num_kv_heads=2, head_dim=128)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with pytest.raises(DeviceError, match="rollout.decode_burst_steps = 8"):
        decode_burst_steps(8, "torch", heads96, cuda)
    assert decode_burst_steps(8, "torch", heads96, cpu) == 8  # CPU bursts use the torch reference attention
    assert decode_burst_steps(0, "torch", heads128, cuda) == 1
    assert decode_burst_steps(0, "flashinfer", heads128, cuda) == 16
    assert decode_burst_steps(0, "flashinfer", heads96, cuda) == 1
