"""The memory plan's activation and workspace bytes against what the runtime really keeps (the dense families; the
hybrid ones in tests/test_saved_bytes_hybrid.py, the loss's and eval's logit chunks in tests/test_saved_bytes_loss.py,
the shared setup in tests/saved_bytes_setup.py).

Nothing here uses the planner's formulas to get an expected value: each test runs the runtime's own function
(runtime/training.py: student_forward, teacher_score, chunked_loss, backward; train/divergence.py:
divergence_metrics) at the real widths of a supported family (2 layers, or one gated-DeltaNet layer for the
backward; a small vocabulary, bf16), measures with tests/memory_probe.py (bytes
saved for backward, storage by storage; the CPU allocator's peak), and compares with the number the planner uses
(opdgraph.sizing, the functions buffers.py calls) within 2%. Attention runs as the GPU's packed path with a
FlashAttention stand-in that saves what the kernel saves (grouped-query K/V native through varlen_attn's enable_gqa
or the aten kernels, or repeated first: the benchmarks' former path), or as the plain-torch reference a CPU run (or
an fp32 model) falls back to, itself, at a few sequence lengths (its S x S scores make the bytes per token grow with
the sequence length). The layer kernels run as torch's and as Liger-Kernel's (models.<name>.kernels; without CUDA
in Triton's interpreter, tests/triton_interpreter.py): the plan assumes both save the same.

The plan goldens (tests/golden/plan_*) are regenerated from the planner's own output with OPDGRAPH_REGEN_GOLDEN=1
(tests/golden_helpers.py): a regenerated golden is not a check by itself. When a sizing formula changes, this file
is what says the new numbers are true; change a golden only together with it.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch

from memory_probe import AllocationTrace, flash_backend, saved_bytes
from opdgraph import sizing
from opdgraph.planned_paths import attention_fallback
from opdgraph.kernels import varlen_attention
from opdgraph.models.layer_kernels import TORCH
from opdgraph.model_shapes import shape_from_hf_config
from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.models.loading import build_random
from opdgraph.runtime import training
from saved_bytes_setup import (FAMILIES, HYBRID, NEEDS_LIGER, PATHS, SEQUENCE_LENGTHS, TOLERANCE, assert_close,
                               family_config, family_model, runtime_context, saved_by_the_training_forward,
                               use_layer_kernels)


@pytest.mark.parametrize("flash_path, kernels", PATHS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_activations_match_the_plan(family, flash_path, kernels, monkeypatch):
    """If this fails, the training forward saves for backward a different number of bytes per token per layer (or
    outside the layers) than the plan's student_activations assume, on one of the attention paths or with one of
    the layer kernels: the plan would under- or over-predict every training step."""
    shape, measured, tokens = saved_by_the_training_forward(family, flash_path, kernels, monkeypatch)
    repeated = flash_path == "repeat_kv"
    per_layer = sizing.activation_bytes_per_token_per_layer(shape, 2, repeated)
    for layer in ("layer0", "layer1"):
        assert_close(measured[layer] / tokens, per_layer, f"{family} {layer} bytes per token")
    # The forward's output is the tensor student_activations holds for the backward: alive, though not saved.
    outside = measured["outside"] + measured["output"].untyped_storage().nbytes()
    assert_close(outside / tokens, sizing.activation_bytes_outside_layers_per_token(shape, 2), f"{family} outside")
    total = measured["layer0"] + measured["layer1"] + outside
    assert_close(total, sizing.activation_bytes(shape, tokens, 2, False, repeated), f"{family} total")


@pytest.mark.parametrize("family, kernels", [*((family, "torch") for family in [*FAMILIES, *HYBRID]),
                                             pytest.param("gemma-3-1b", "liger", marks=NEEDS_LIGER)])
def test_checkpointed_forward_keeps_layer_inputs(family, kernels, monkeypatch):
    """If this fails, activation checkpointing keeps more (or less) than each layer's input between forward and
    backward; the plan's checkpointed activations would be wrong."""
    config = family_config(family)
    shape = shape_from_hf_config(config)
    model = family_model(family)
    model.set_attention_backend(flash_backend(monkeypatch))
    use_layer_kernels(model, kernels, monkeypatch)
    inputs, loop, tokens = runtime_context(model, checkpointing=True)

    def forward():
        training.student_forward(inputs, keep_graph=True, write_hidden=True)
        return inputs.values.get_item("student_activations", 0)

    measured = saved_bytes(model, forward, inputs=(loop.micro_batch.input_ids,))
    total = sum(measured[region] for region in ("layer0", "layer1", "outside"))
    total += measured["output"].untyped_storage().nbytes()
    # The plan adds one recomputed layer's activations, alive only while that layer's backward runs.
    recomputed = tokens * sizing.activation_bytes_per_token_per_layer(shape, 2)
    assert_close(total, sizing.activation_bytes(shape, tokens, 2, True) - recomputed, family)


@pytest.mark.parametrize("flash_path, kernels", [("aten", "torch"), ("repeat_kv", "torch"),
                                                 pytest.param("aten", "liger", marks=NEEDS_LIGER)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_forward_peak_matches_the_workspace(family, flash_path, kernels, monkeypatch):
    """If this fails, the no-grad forward (teacher scoring) peaks above or below the plan's forward workspace, on
    either attention path (the peak is inside an MLP either way) and with either layer kernels."""
    shape = shape_from_hf_config(family_config(family))
    model = family_model(family)
    model.set_attention_backend(flash_backend(monkeypatch, flash_path))
    use_layer_kernels(model, kernels, monkeypatch)
    inputs, loop, tokens = runtime_context(model)
    with AllocationTrace() as trace:
        training.teacher_score(inputs)
    assert_close(trace.peak(), sizing.forward_workspace_bytes(shape, tokens, 2), family)


def test_flash_head_dim_limit_mirrors_the_kernel():
    """If this fails, the planner's FlashAttention head_dim limit (whether K/V heads are repeated) drifted from the
    kernel module's."""
    assert sizing.FLASH_MAX_HEAD_DIM == varlen_attention.MAX_HEAD_DIM


# The plain-torch reference attention (every CPU run; on CUDA fp32 models and head_dims FlashAttention cannot take):
# (family, dtype, sequence lengths of one micro-batch). Sequences of one length are the plan's worst case (T / S
# sequences of S tokens), so the plan must match them; a batch of mixed lengths must stay under it.
REFERENCE_ACTIVATION_CASES = [
    ("qwen2.5-1.5b", torch.bfloat16, (64, 64, 64)),
    ("qwen2.5-1.5b", torch.bfloat16, (320,)),
    ("gemma-3-1b", torch.bfloat16, (96, 96)),  # head_dim 256, 4 norms, q/k norms, a sliding layer
    ("qwen3-4b", torch.bfloat16, (128,)),
    ("smollm2-135m", torch.float32, (256, 256)),  # fp32: the softmax output is the probabilities, saved once
    ("llama-3.2-1b", torch.bfloat16, SEQUENCE_LENGTHS),  # mixed lengths: at most the plan
]
# The no-grad peak: sequences long enough that the attention's scores, not the MLP, set it (all but gemma's, the
# MLP's case, which the plan's max must still pick); two sequences: the first one's output is held meanwhile.
REFERENCE_WORKSPACE_CASES = [
    ("qwen2.5-1.5b", torch.bfloat16, (512,)),
    ("qwen3-4b", torch.bfloat16, (256,)),
    ("smollm2-135m", torch.float32, (1024, 1024)),
    ("gemma-3-1b", torch.bfloat16, (96, 96)),
    ("llama-3.2-1b", torch.bfloat16, SEQUENCE_LENGTHS),
]


@functools.lru_cache(maxsize=None)
def reference_model(family: str, dtype: torch.dtype):
    """The family's model in `dtype` (bf16: the shared one of family_model)."""
    return family_model(family) if dtype == torch.bfloat16 else build_random(family_config(family), dtype=dtype)


def _reference_case(family, dtype, lengths):
    """The model with the packed backend a CPU run selects (the reference), its runtime context over `lengths`."""
    shape = shape_from_hf_config(family_config(family))
    model = reference_model(family, dtype)
    model.set_attention_backend(varlen_attention.select_packed_backend("cpu"))
    model.set_layer_kernels(TORCH)
    assert isinstance(model.backend, TorchReferenceBackend)
    inputs, loop, tokens = runtime_context(model, lengths=lengths)
    return shape, model, inputs, loop, tokens, dtype.itemsize, max(lengths), len(set(lengths)) == 1


@pytest.mark.parametrize("family, dtype, lengths", REFERENCE_ACTIVATION_CASES)
def test_reference_attention_saved_activations_match_the_plan(family, dtype, lengths):
    """If this fails, the plain-torch attention fallback saves for backward a different number of bytes per token
    per layer (its score and probability matrices, its mask, K/V repeated) than the plan's student_activations
    assume for a CPU target or an fp32 model: CPU runs would be under- (or over-) planned, more so the longer the
    sequences."""
    shape, model, inputs, loop, tokens, dtype_bytes, longest, uniform = _reference_case(family, dtype, lengths)

    def forward():
        training.student_forward(inputs, keep_graph=True, write_hidden=True)
        return inputs.values.get_item("student_activations", 0)

    measured = saved_bytes(model, forward, inputs=(loop.micro_batch.input_ids,))
    per_layer = sizing.activation_bytes_per_token_per_layer(shape, dtype_bytes, reference_sequence_tokens=longest)
    for layer in ("layer0", "layer1"):
        if uniform:
            assert_close(measured[layer] / tokens, per_layer, f"{family} {lengths} {layer} bytes per token")
        else:
            assert measured[layer] / tokens <= per_layer, f"{family} {lengths} {layer} above the worst case"
    outside = measured["outside"] + measured["output"].untyped_storage().nbytes()
    planned = sizing.activation_bytes(shape, tokens, dtype_bytes, False, reference_sequence_tokens=longest)
    total = measured["layer0"] + measured["layer1"] + outside
    if uniform:
        assert_close(total, planned, f"{family} {lengths} total")
    else:
        assert total <= planned


@pytest.mark.parametrize("family, dtype, lengths", REFERENCE_WORKSPACE_CASES)
def test_reference_attention_forward_peak_matches_the_workspace(family, dtype, lengths):
    """If this fails, the no-grad forward (teacher scoring, eval scoring) through the plain-torch attention peaks
    above or below the plan's forward workspace: one sequence's scores, their fp32 copy and softmax output can
    exceed the MLP's peak, and the plan would miss it."""
    shape, model, inputs, loop, tokens, dtype_bytes, longest, uniform = _reference_case(family, dtype, lengths)
    with AllocationTrace() as trace:
        training.teacher_score(inputs)
    planned = sizing.forward_workspace_bytes(shape, tokens, dtype_bytes, reference_sequence_tokens=longest)
    if uniform:
        assert_close(trace.peak(), planned, f"{family} {lengths}")
    else:
        assert trace.peak() <= planned * (1 + TOLERANCE)


def test_planned_fallback_mirrors_the_kernel():
    """If this fails, the planner's rule for when packed attention falls back to plain torch
    (buffers.attention_fallback) drifted from the kernel module's (varlen_attention.unsupported_reason): a plan would
    size FlashAttention's saves for a run that saves S x S scores, or the reverse."""
    support = varlen_attention.VarlenSupport(True, enable_gqa=True)
    for device in ("cpu", "cuda"):
        for dtype, dtype_name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                                  (torch.float32, "float32")):
            for head_dim in (64, 100, 128, 256, 260, 512):
                q = types.SimpleNamespace(is_cuda=device == "cuda", device=torch.device(device), dtype=dtype,
                                          shape=(8, 4, head_dim))
                cfg = types.SimpleNamespace(pipeline=types.SimpleNamespace(device=device),
                                            shapes={"m": types.SimpleNamespace(head_dim=head_dim)},
                                            models={"m": types.SimpleNamespace(dtype=dtype_name)})
                kernel_falls_back = varlen_attention.unsupported_reason(q, None, support) is not None
                assert attention_fallback(cfg, "m") == kernel_falls_back, (device, dtype_name, head_dim)
