"""The loss's and eval's per-chunk peaks (the plan's logit chunk) against the CPU allocator's, on the CPU path and
on emulations of the CUDA paths (tests/memory_probe.py). Method and standard as tests/test_saved_bytes.py says."""

from __future__ import annotations

import types

import pytest
import torch

from memory_probe import AllocationTrace, cuda_fused_loss, cuda_torch_loss
from opdgraph import sizing
from opdgraph.runtime import training
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.stage_inputs import LoopState, StageInputs
from opdgraph.train.divergence import divergence_metrics
from saved_bytes_setup import TOLERANCE, assert_close, one_teacher_stage

# Loss test sizes: a student vocabulary not a multiple of the chunk, a larger teacher vocabulary, a last chunk
# shorter than the others.
LOSS_VOCAB, TEACHER_VOCAB, STUDENT_HIDDEN, TEACHER_HIDDEN, POSITIONS, CHUNK = 4000, 4064, 256, 384, 150, 64
LOSS_PATHS = {  # name -> (emulation of the device path, fused kernel, fp32 lm_head copies)
    "cpu_torch": (None, False, True),
    "cuda_torch": (cuda_torch_loss, False, False),
    "cuda_fused": (cuda_fused_loss, True, False),
}


def _loss_context(divergence: str, kernel: str):
    generator = torch.Generator().manual_seed(1)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=generator) * scale).to(torch.bfloat16)

    student = types.SimpleNamespace(lm_head_weight=randn(LOSS_VOCAB, STUDENT_HIDDEN, scale=0.05))
    teacher = types.SimpleNamespace(lm_head_weight=randn(TEACHER_VOCAB, TEACHER_HIDDEN, scale=0.05))
    buffers = BufferTable()
    buffers.put_item("student_hidden", 0, randn(POSITIONS, STUDENT_HIDDEN))
    buffers.put_item("teacher_hidden", 0, randn(POSITIONS, TEACHER_HIDDEN))
    lm_head_grad = torch.zeros(LOSS_VOCAB, STUDENT_HIDDEN)  # the fp32 accumulator the loss adds into
    buffers.put("student.grads", {"lm_head": lm_head_grad})
    batch = types.SimpleNamespace(index=0, group="", weights=torch.full((POSITIONS,), 1.0 / POSITIONS),
                                  target_ids=torch.randint(0, LOSS_VOCAB, (POSITIONS,), generator=generator))
    inputs = StageInputs(step=None, loop=LoopState(micro_batch=batch), values=buffers,
                         models={"student": student, "teachers": one_teacher_stage(teacher),
                                 "gradients": types.SimpleNamespace(lm_head=lambda: lm_head_grad)},
                         run=types.SimpleNamespace(record={}, facts={"grads_buffer": "student.grads"}))
    config = types.SimpleNamespace(divergence=divergence, beta=0.5, temperature=1.3, chunk_tokens=CHUNK,
                                   kernel=kernel)
    return config, inputs, inputs.loop


@pytest.mark.parametrize("divergence", list(sizing.TORCH_LOSS_LOGIT_BUFFERS))
@pytest.mark.parametrize("path", list(LOSS_PATHS))
def test_loss_chunk_peak_matches_the_logit_chunk(path, divergence, monkeypatch):
    """If this fails, the chunked loss's peak (beyond its inputs and the planned hidden_grad) differs from the plan's
    logit_chunk for the path that runs on that device."""
    emulate, fused, upcast = LOSS_PATHS[path]
    if emulate is not None:
        emulate(monkeypatch)
    config, inputs, _ = _loss_context(divergence, kernel="auto" if fused else "torch")
    with AllocationTrace() as trace:
        training.chunked_loss(config, inputs)
    hidden_grad = POSITIONS * STUDENT_HIDDEN * 2  # the planned hidden_grad buffer, allocated by the loss
    buffers = sizing.FUSED_LOSS_LOGIT_BUFFERS if fused else sizing.TORCH_LOSS_LOGIT_BUFFERS[divergence]
    planned = sizing.logit_chunk_bytes(CHUNK, LOSS_VOCAB, buffers, fused=fused,
                                       upcast_hidden=STUDENT_HIDDEN + TEACHER_HIDDEN if upcast else 0)
    assert_close(trace.peak() - hidden_grad, planned, f"{path} {divergence}")


@pytest.mark.parametrize("path", ["cpu_torch", "cuda_torch"])
def test_eval_metrics_peak_matches_the_plan(path, monkeypatch):
    """If this fails, eval's chunked divergence metrics peak differently from the eval workspace's metrics term."""
    emulate, _, upcast = LOSS_PATHS[path]
    if emulate is not None:
        emulate(monkeypatch)
    _, inputs, _ = _loss_context("forward_kl", kernel="torch")
    hidden = inputs.values.get_item("student_hidden", 0), inputs.values.get_item("teacher_hidden", 0)
    teacher = inputs.models["teachers"]["teacher_score"].model
    with AllocationTrace() as trace:
        divergence_metrics(hidden[0], inputs.models["student"].lm_head_weight, hidden[1], teacher.lm_head_weight,
                           chunk_tokens=CHUNK)
    planned = sizing.logit_chunk_bytes(CHUNK, LOSS_VOCAB, sizing.EVAL_METRICS_LOGIT_BUFFERS,
                                       upcast_hidden=STUDENT_HIDDEN + TEACHER_HIDDEN if upcast else 0)
    assert_close(trace.peak(), planned, path)


def _mixture_loss_inputs(divergence: str):
    """The loss stage's inputs with two teachers mixed 0.7 / 0.3 (hidden widths 384 and 192)."""
    from opdgraph.runtime.teachers import TeacherRuntime
    from opdgraph.teachers import TeacherSpec

    config, inputs, loop = _loss_context(divergence, kernel="torch")
    generator = torch.Generator().manual_seed(2)
    first = inputs.models["teachers"]["teacher_score"].model
    second = types.SimpleNamespace(lm_head_weight=(torch.randn(LOSS_VOCAB, TEACHER_HIDDEN // 2, generator=generator)
                                                   * 0.05).to(torch.bfloat16))
    inputs.values.put_item("teacher_hidden.b", 0, torch.randn(POSITIONS, TEACHER_HIDDEN // 2,
                                                              generator=generator).to(torch.bfloat16))
    teachers = {}
    for stage, hidden, weight, model in (("teacher_score", "teacher_hidden", 0.7, first),
                                         ("teacher_score.b", "teacher_hidden.b", 0.3, second)):
        spec = TeacherSpec(stage=stage, short=stage.partition(".")[2], model=stage, weights=stage, self_teacher=False,
                           own_weights=True,
                           hidden=hidden, routes=(stage,), mixture_weight=weight, prompt_tokens=0, has_context=False)
        teachers[stage] = TeacherRuntime(spec=spec, model=model)
    return config, StageInputs(step=None, loop=loop, values=inputs.values, run=inputs.run,
                               models={**inputs.models, "teachers": teachers})


@pytest.mark.parametrize("divergence", list(sizing.TORCH_LOSS_LOGIT_BUFFERS))
@pytest.mark.parametrize("path", ["cpu_torch", "cuda_torch"])
def test_mixture_loss_chunk_peak_is_within_the_logit_chunk(path, divergence, monkeypatch):
    """If this fails, the mixture loss (the running mixture, then each teacher's own divergence for the log beside a
    copy of the student's logits) peaks above the plan's mixture logit_chunk, or far below it."""
    emulate, _, upcast = LOSS_PATHS[path]
    if emulate is not None:
        emulate(monkeypatch)
    config, inputs = _mixture_loss_inputs(divergence)
    with AllocationTrace() as trace:
        training.chunked_loss(config, inputs)
    assert {"divergence[teacher_score]", "divergence[teacher_score.b]"} <= set(inputs.run.record)
    hidden_grad = POSITIONS * STUDENT_HIDDEN * 2
    buffers = sizing.TORCH_LOSS_LOGIT_BUFFERS[divergence] + sizing.MIXTURE_EXTRA_LOGIT_BUFFERS
    planned = sizing.logit_chunk_bytes(CHUNK, LOSS_VOCAB, buffers, upcast_hidden=(
        STUDENT_HIDDEN + TEACHER_HIDDEN + TEACHER_HIDDEN // 2) if upcast else 0)
    measured, chunk_buffer = trace.peak() - hidden_grad, CHUNK * LOSS_VOCAB * 4
    # The mixture's extra buffers are a bound: the per-teacher pass holds one of the two at its peak.
    assert planned - 2 * chunk_buffer <= measured <= planned * (1 + TOLERANCE), f"{path} {divergence}: " \
        f"{measured:,} vs {planned:,}"


@pytest.mark.parametrize("path", ["cpu_torch", "cuda_torch"])
def test_mixture_eval_metrics_peak_is_within_the_plan(path, monkeypatch):
    """If this fails, eval's metrics against a mixture of teachers peak otherwise than the eval workspace's metrics
    term (stages/eval.py: the single teacher's buffers, every lm_head upcast on CPU): the running mixture is made
    before the metrics' own peak."""
    emulate, _, upcast = LOSS_PATHS[path]
    if emulate is not None:
        emulate(monkeypatch)
    _, inputs = _mixture_loss_inputs("forward_kl")
    teachers = list(inputs.models["teachers"].values())
    hidden = [inputs.values.get_item(name, 0) for name in ("student_hidden", "teacher_hidden", "teacher_hidden.b")]
    with AllocationTrace() as trace:
        divergence_metrics(hidden[0], inputs.models["student"].lm_head_weight, hidden[1:],
                           [teacher.model.lm_head_weight for teacher in teachers], chunk_tokens=CHUNK,
                           mixture_weights=[teacher.spec.mixture_weight for teacher in teachers])
    planned = sizing.logit_chunk_bytes(CHUNK, LOSS_VOCAB, sizing.EVAL_METRICS_LOGIT_BUFFERS, upcast_hidden=(
        STUDENT_HIDDEN + TEACHER_HIDDEN + TEACHER_HIDDEN // 2) if upcast else 0)
    assert_close(trace.peak(), planned, path)
