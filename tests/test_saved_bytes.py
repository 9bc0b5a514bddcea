"""The memory plan's activation, workspace and logit-chunk bytes against what the runtime really keeps.

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
import json
import os
import pathlib
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import opdgraph  # noqa: E402
from memory_probe import (FLASH_PATHS, AllocationTrace, cuda_fused_loss, cuda_torch_loss,  # noqa: E402
                          flash_backend, saved_bytes)
from triton_interpreter import interpret_liger  # noqa: E402
from opdgraph import sizing  # noqa: E402
from opdgraph.planned_paths import attention_fallback  # noqa: E402
from opdgraph.kernels import varlen_attention  # noqa: E402
from opdgraph.kernels.liger_layers import liger_import_error  # noqa: E402
from opdgraph.models.layer_kernels import TORCH  # noqa: E402
from opdgraph.model_shapes import shape_from_hf_config
from opdgraph.models.attention_backend import TorchReferenceBackend
from opdgraph.models.attention_metadata import PackedMetadata
from opdgraph.models.loading import build_random
from opdgraph.runtime import training
from opdgraph.runtime.batches import MicroBatch
from opdgraph.runtime.buffers import BufferTable
from opdgraph.runtime.stage_inputs import LoopState, StageInputs
from opdgraph.train.divergence import divergence_metrics

CONFIGS = pathlib.Path(opdgraph.__file__).parent / "model_configs"
# Published widths of the two families without a shipped config.json.
LLAMA_3_2_1B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
                "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
GEMMA_3_1B = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 1152,
              "intermediate_size": 6912, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
              "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1_000_000.0,
              "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
              "tie_word_embeddings": True, "max_position_embeddings": 32768,
              # the real model's two kinds of layer (5 sliding : 1 global), one of each
              "layer_types": ["sliding_attention", "full_attention"]}
FAMILIES = {
    "qwen2.5-1.5b": "qwen2.5-1.5b-instruct.json",
    "qwen3-4b": "qwen3-4b.json",
    "llama-3.2-1b": LLAMA_3_2_1B,
    "gemma-3-1b": GEMMA_3_1B,
    "smollm2-135m": "smollm2-135m-instruct.json",
}
# Qwen3.5-0.8B's widths, one layer of each kind: a gated-DeltaNet layer, then a gated full-attention layer.
HYBRID = {"qwen3.5-0.8b": "qwen3.5-0.8b-text.json", "qwen3.5-4b": "qwen3.5-4b-text.json"}
HYBRID_LAYER_TYPES = ["linear_attention", "full_attention"]
VOCAB = 512
SEQUENCE_LENGTHS = (40, 17, 7)  # one micro-batch of three packed sequences, 64 tokens
TOLERANCE = 0.02



def _teachers(model) -> dict:
    """The runtime's one teacher stage, scoring with `model` (what build_teachers makes of [teacher_score])."""
    from opdgraph.runtime.teachers import TeacherRuntime
    from opdgraph.teachers import TeacherSpec

    spec = TeacherSpec(stage="teacher_score", short="", model="teacher", weights="teacher", self_teacher=False,
                       own_weights=True, hidden="teacher_hidden", routes=("teacher_score",), mixture_weight=None,
                       prompt_tokens=0, has_context=False)
    return {"teacher_score": TeacherRuntime(spec=spec, model=model)}

def family_config(family: str) -> dict:
    source = {**FAMILIES, **HYBRID}[family]
    config = json.loads((CONFIGS / source).read_text()) if isinstance(source, str) else dict(source)
    if family in HYBRID:
        config["layer_types"] = HYBRID_LAYER_TYPES
    return {**config, "num_hidden_layers": 2, "vocab_size": VOCAB}


@functools.lru_cache(maxsize=None)
def family_model(family: str):
    """One bf16 model per family for the whole file (building real widths takes seconds; no test changes it)."""
    return build_random(family_config(family), dtype=torch.bfloat16)


def micro_batch(vocab: int = VOCAB, lengths: tuple[int, ...] = SEQUENCE_LENGTHS) -> MicroBatch:
    generator = torch.Generator().manual_seed(0)
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    input_ids = torch.randint(0, vocab, (bounds[-1],), generator=generator)
    loss_positions = torch.cat([torch.arange(start + 2, end) for start, end in zip(bounds, bounds[1:])])
    return MicroBatch(
        input_ids=input_ids, positions=torch.cat([torch.arange(length) for length in lengths]),
        meta=PackedMetadata(cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(lengths)),
        loss_positions=loss_positions, target_ids=input_ids[loss_positions],
        weights=torch.full((len(loss_positions),), 1.0 / len(loss_positions)),
        sample_of_position=torch.zeros(len(loss_positions), dtype=torch.long), samples=[])


def runtime_context(model, checkpointing: bool = False, lengths: tuple[int, ...] = SEQUENCE_LENGTHS):
    """The StageInputs the loss's student forward and the teacher stage get, both with `model`, over one micro-batch
    of `lengths`."""
    batch = micro_batch(lengths=lengths)
    loop = LoopState(micro_batch=batch)
    inputs = StageInputs(step=None, loop=loop, values=BufferTable(),
                         models={"student": model, "teacher": _teachers(model)["teacher_score"]},
                         run=types.SimpleNamespace(facts={"activation_checkpointing": checkpointing}))
    return inputs, loop, batch.num_tokens


def assert_close(measured: float, planned: float, what: str) -> None:
    assert abs(measured - planned) <= TOLERANCE * measured, f"{what}: measured {measured:,.0f}, plan {planned:,.0f}"


# The probes run on CPU tensors: Liger's kernels only in Triton's interpreter (where CUDA is there, they compile for
# it instead; the GPU side is measured by benchmarks/step.py --variants, predicted beside measured).
NEEDS_LIGER = pytest.mark.skipif(liger_import_error() is not None or torch.cuda.is_available(),
                                 reason="needs liger_kernel, interpreted (a machine without CUDA)")
# (flash path, layer kernels): torch's kernels on every attention path; Liger's (interpreted on CPU: seconds per
# model at real widths) on the path the GPU machines run, torch < 2.12's aten kernels.
PATHS = [*((path, "torch") for path in FLASH_PATHS), pytest.param("aten", "liger", marks=NEEDS_LIGER)]


def use_layer_kernels(model, name: str, monkeypatch) -> None:
    """Give the shared model torch's or Liger's layer kernels (Liger's interpreted on a CPU machine)."""
    if name == "torch":
        model.set_layer_kernels(TORCH)
        return
    from opdgraph.kernels.liger_layers import LigerLayerKernels

    interpret_liger(monkeypatch)
    model.set_layer_kernels(LigerLayerKernels())


@pytest.mark.parametrize("flash_path, kernels", PATHS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_activations_match_the_plan(family, flash_path, kernels, monkeypatch):
    """If this fails, the training forward saves for backward a different number of bytes per token per layer (or
    outside the layers) than the plan's student_activations assume, on one of the attention paths or with one of
    the layer kernels: the plan would under- or over-predict every training step."""
    config = family_config(family)
    shape, repeated = shape_from_hf_config(config), flash_path == "repeat_kv"
    model = family_model(family)
    model.set_attention_backend(flash_backend(monkeypatch, flash_path))
    use_layer_kernels(model, kernels, monkeypatch)
    inputs, loop, tokens = runtime_context(model)

    def forward():
        training.student_forward(inputs, keep_graph=True, write_hidden=True)
        return inputs.values.get_item("student_activations", 0)

    measured = saved_bytes(model, forward, inputs=(loop.micro_batch.input_ids,))
    per_layer = sizing.activation_bytes_per_token_per_layer(shape, 2, repeated)
    for layer in ("layer0", "layer1"):
        assert_close(measured[layer] / tokens, per_layer, f"{family} {layer} bytes per token")
    # The forward's output is the tensor student_activations holds for the backward: alive, though not saved.
    outside = measured["outside"] + measured["output"].untyped_storage().nbytes()
    assert_close(outside / tokens, sizing.activation_bytes_outside_layers_per_token(shape, 2), f"{family} outside")
    total = measured["layer0"] + measured["layer1"] + outside
    assert_close(total, sizing.activation_bytes(shape, tokens, 2, False, repeated), f"{family} total")


@pytest.mark.parametrize("flash_path, kernels", PATHS)
@pytest.mark.parametrize("family", list(HYBRID))
def test_hybrid_saved_activations_match_the_plan(family, flash_path, kernels, monkeypatch):
    """If this fails, a Qwen3.5 gated-DeltaNet layer (a_linear) or its gated, partially rotated attention layer saves
    another number of bytes per token than the plan assumes for each kind."""
    config = family_config(family)
    shape, repeated = shape_from_hf_config(config), flash_path == "repeat_kv"
    model = family_model(family)
    model.set_attention_backend(flash_backend(monkeypatch, flash_path))
    use_layer_kernels(model, kernels, monkeypatch)
    inputs, loop, tokens = runtime_context(model)

    def forward():
        training.student_forward(inputs, keep_graph=True, write_hidden=True)
        return inputs.values.get_item("student_activations", 0)

    measured = saved_bytes(model, forward, inputs=(loop.micro_batch.input_ids,))
    assert_close(measured["layer0"] / tokens, sizing.linear_layer_bytes_per_token(shape, 2), f"{family} linear layer")
    assert_close(measured["layer1"] / tokens, sizing.attention_layer_bytes_per_token(shape, 2, repeated),
                 f"{family} attention layer")
    outside = measured["outside"] + measured["output"].untyped_storage().nbytes()
    assert_close(outside / tokens, sizing.activation_bytes_outside_layers_per_token(shape, 2), f"{family} outside")
    total = measured["layer0"] + measured["layer1"] + outside
    assert_close(total, sizing.activation_bytes(shape, tokens, 2, False, repeated), f"{family} total")


HYBRID_WORKSPACE_CASES = [("qwen3.5-0.8b", (256,)), ("qwen3.5-0.8b", (128, 128, 128, 128)),
                          ("qwen3.5-0.8b", SEQUENCE_LENGTHS), ("qwen3.5-4b", (192,)), ("qwen3.5-4b", (96, 96)),
                          ("qwen3.5-0.8b", (5,) * 40)]


@pytest.mark.parametrize("family, lengths", HYBRID_WORKSPACE_CASES)
def test_hybrid_forward_peak_is_covered_by_the_workspace(family, lengths, monkeypatch):
    """If this fails, the no-grad forward of a Qwen3.5 model (teacher scoring) peaks inside a linear-attention
    layer's batched core above the plan's forward workspace (at the bound on padded tokens), or the core's formula
    at the padded tokens these sequences really have holds much more than it uses (15%: the solver's copies are read
    off the allocator at one width). (5,) x 40: more sequences than one scan group holds."""
    from opdgraph.models import delta_rule

    shape = shape_from_hf_config(family_config(family))
    model = family_model(family)
    model.set_attention_backend(flash_backend(monkeypatch))
    model.set_layer_kernels(TORCH)
    inputs, loop, tokens = runtime_context(model, lengths=lengths)
    with AllocationTrace() as trace:
        training.teacher_score(inputs)
    planned = sizing.forward_workspace_bytes(shape, tokens, 2, reference_sequence_tokens=max(lengths),
                                             sequences=len(lengths))
    assert trace.peak() <= planned, f"{family} {lengths}: {trace.peak():,} vs {planned:,}"
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    chunk = delta_rule.CHUNK_TOKENS
    padded = max(sum(-(-(bounds[i + 1] - bounds[i]) // chunk) * chunk for i in range(first, last))
                 for first, last in delta_rule.scan_groups(tuple(bounds), chunk))  # the largest group's
    exact = sizing.linear_core_peak_bytes(shape, tokens, 2, len(lengths), padded_tokens=padded)
    assert trace.peak() <= exact <= 1.15 * trace.peak(), f"{family} {lengths}: {trace.peak():,} vs {exact:,}"


@functools.lru_cache(maxsize=None)
def linear_layer_model(family: str):
    """(model, shape) of one gated-DeltaNet layer at the family's widths. The backward's input gradients are bf16
    matmuls whose second operand is contiguous, which CPU BLAS runs ~15x slower than the forward's: an attention
    layer beside it would only add minutes."""
    config = {**family_config(family), "layer_types": ["linear_attention"], "num_hidden_layers": 1}
    return build_random(config, dtype=torch.bfloat16), shape_from_hf_config(config)


def backward_trace(model, lengths: tuple[int, ...], checkpointing: bool = False):
    """(the AllocationTrace of training.backward, tokens) after a training forward over `lengths`, with the
    runtime's fp32 gradient sums (each bf16 gradient folded into an accumulator allocated beforehand and dropped at
    once: runtime/gradients.py)."""
    from opdgraph.runtime.gradients import StudentGradients

    model.set_attention_backend(varlen_attention.select_packed_backend("cpu"))
    model.set_layer_kernels(TORCH)
    inputs, loop, tokens = runtime_context(model, checkpointing=checkpointing, lengths=lengths)
    training.student_forward(inputs, keep_graph=True, write_hidden=True)
    hidden = inputs.values.get_item(loop.local("student_hidden"), 0)
    inputs.values.put_item(loop.local("hidden_grad"), 0, torch.randn_like(hidden))  # what the loss hands on
    gradients = StudentGradients(model, inputs.values, "student.grads", fp32=True)
    gradients.accumulators()
    try:
        with AllocationTrace() as trace:
            training.backward(inputs)
    finally:
        gradients.close()
    return trace, tokens


def padded_tokens(lengths: tuple[int, ...]) -> int:
    """P of sizing.py: every sequence padded to whole chunks of the delta rule."""
    from opdgraph.models import delta_rule

    chunk = delta_rule.CHUNK_TOKENS
    return sum(-(-length // chunk) * chunk for length in lengths)


# One long sequence, several (one shorter than a chunk), many short ones (three scan groups, one chunk each).
HYBRID_BACKWARD_CASES = [("qwen3.5-0.8b", (256,)), ("qwen3.5-0.8b", (128, 96, 32)), ("qwen3.5-0.8b", (5,) * 40),
                         ("qwen3.5-4b", (128,)), ("qwen3.5-4b", (40, 17, 7))]


@pytest.mark.parametrize("family, lengths", HYBRID_BACKWARD_CASES)
def test_hybrid_backward_peak_is_covered_by_the_workspace(family, lengths):
    """If this fails, the backward of a Qwen3.5 linear-attention layer (RecomputedCore running its torch core again
    with autograd and differentiating it: CPU, and Hopper where fla's backward is refused) peaks above the plan's
    backward workspace at the bound on padded tokens, or linear_recompute_peak_bytes at the padded tokens these
    sequences really have misses a tensor (under the peak) or counts one that is not there (20% over it)."""
    model, shape = linear_layer_model(family)
    trace, tokens = backward_trace(model, lengths)
    # While the core's backward runs: on CPU the fold of the largest weight's gradient copies it to fp32 first, a
    # transient of the gradients (above this peak at 4B's widths), not of the layer's backward.
    measured = trace.peak(within="RecomputedCoreBackward")
    planned = sizing.backward_workspace_bytes(shape, tokens, 2, len(lengths), reference_sequence_tokens=max(lengths))
    assert measured <= planned, f"{family} {lengths}: {measured:,} vs {planned:,}"
    exact = sizing.linear_recompute_peak_bytes(shape, tokens, 2, len(lengths), padded_tokens=padded_tokens(lengths))
    assert measured <= exact <= 1.2 * measured, f"{family} {lengths}: {measured:,} vs {exact:,}"


def test_checkpointed_hybrid_backward_peak_is_covered():
    """If this fails, a checkpointed linear-attention layer's backward (its forward recomputed, its core's no-grad
    peak inside that, then the core recomputed again with autograd) peaks above the backward workspace plus the one
    recomputed layer the checkpointed activations hold."""
    lengths = (128, 96, 32)
    model, shape = linear_layer_model("qwen3.5-0.8b")
    trace, tokens = backward_trace(model, lengths, checkpointing=True)
    recomputed = tokens * sizing.activation_bytes_per_token_per_layer(shape, 2, reference_sequence_tokens=max(lengths))
    planned = sizing.backward_workspace_bytes(shape, tokens, 2, len(lengths), reference_sequence_tokens=max(lengths))
    assert trace.peak() <= planned + recomputed, f"{trace.peak():,} vs {planned:,} + {recomputed:,}"


def test_the_backward_workspace_plans_the_recompute_over_every_sequence_of_the_step():
    """If this fails, the plan sizes a hybrid student's backward without its linear layers' recomputing core, or for
    fewer sequences than a micro-batch may pack (short responses: many more than sequences_per_micro_batch, each
    padded to whole chunks in the recompute's graph; the test above measures that peak)."""
    from opdgraph.compile import compile_plan
    from opdgraph.config.loader import load_pipeline

    cfg = load_pipeline(str(pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "qwen35_0b8_from_4b.toml"))
    plan, shape = compile_plan(cfg), cfg.shapes[cfg.model_with_role("student")]
    tokens, sequences = plan.facts["train.micro_batch_tokens"], plan.facts["rollout.sequences"]
    needed = sizing.linear_recompute_peak_bytes(shape, tokens, 2, sequences)
    assert plan.buffers["backward.workspace"].bytes == needed > tokens * sizing.linear_layer_bytes_per_token(shape, 2)


@pytest.mark.parametrize("family, rows", [("qwen3.5-0.8b", 8), ("qwen3.5-4b", 3)])
def test_hybrid_decode_step_peak_is_covered_by_the_rollout_workspace(family, rows):
    """If this fails, a decode step of the torch linear core (CPU targets: every running sequence's state gathered
    and rebuilt) peaks above the plan's linear_decode_peak_bytes, or the plan holds much more than it uses (15%)."""
    from opdgraph.models.attention_metadata import PagedMetadata
    from opdgraph.models.linear_attention_backend import TorchLinearAttention
    from opdgraph.models.linear_state import LinearLayerState

    shape = shape_from_hf_config(family_config(family))
    layer = next(layer.linear_attn for layer in family_model(family).layers if hasattr(layer, "linear_attn"))
    dims, generator = layer.dims, torch.Generator().manual_seed(0)
    state = LinearLayerState.allocate(rows + 1, dims, torch.bfloat16, "cpu")
    mixed = torch.randn(rows, dims.conv_channels, generator=generator).to(torch.bfloat16)
    decay = -torch.rand(rows, dims.value_heads, generator=generator)
    beta = torch.rand(rows, dims.value_heads, generator=generator).to(torch.bfloat16)
    ones = torch.ones(rows, dtype=torch.int32)
    meta = PagedMetadata(query_lens=ones, cu_query_lens=torch.arange(rows + 1, dtype=torch.int32), kv_lens=ones + 5,
                         page_table=torch.zeros(rows, 1, dtype=torch.int32),
                         slot_mapping=torch.zeros(rows, dtype=torch.int64), page_size=16,
                         state_slots=torch.arange(rows))
    with torch.no_grad(), AllocationTrace() as trace:
        TorchLinearAttention().paged(mixed, layer.conv1d.weight, decay, beta, dims, meta=meta, state=state)
    planned = sizing.linear_decode_peak_bytes(shape, rows, 2, in_place=False)
    assert trace.peak() <= planned <= 1.15 * trace.peak(), f"{family}: {trace.peak():,} vs {planned:,}"


@pytest.mark.parametrize("family, lengths", [("qwen3.5-0.8b", (100, 30, 200, 70)), ("qwen3.5-4b", (64, 9)),
                                             ("qwen3.5-0.8b", (8,) * 64)])
def test_hybrid_prefill_peak_is_covered_by_the_rollout_workspace(family, lengths):
    """If this fails, a rollout prefill through the batched torch core (rows continuing from their slots: gathered
    states, the scan building every row's state, the final states written back) peaks above the plan's
    linear_core_peak_bytes(paged), or the plan holds far more than it uses (50%: the plan also counts the layer's
    input, norm and in_proj outputs, which this call does not allocate; 2x for 64 short rows)."""
    from opdgraph.models.attention_metadata import PagedMetadata
    from opdgraph.models.linear_attention_backend import TorchLinearAttention
    from opdgraph.models.linear_state import LinearLayerState

    shape = shape_from_hf_config(family_config(family))
    layer = next(layer.linear_attn for layer in family_model(family).layers if hasattr(layer, "linear_attn"))
    dims, generator, rows, tokens = layer.dims, torch.Generator().manual_seed(0), len(lengths), sum(lengths)
    state = LinearLayerState.allocate(rows + 1, dims, torch.bfloat16, "cpu")
    mixed = torch.randn(tokens, dims.conv_channels, generator=generator).to(torch.bfloat16)
    decay = -torch.rand(tokens, dims.value_heads, generator=generator)
    beta = torch.rand(tokens, dims.value_heads, generator=generator).to(torch.bfloat16)
    query = torch.tensor(lengths, dtype=torch.int32)
    meta = PagedMetadata(query_lens=query, cu_query_lens=torch.tensor([0, *query.cumsum(0)], dtype=torch.int32),
                         kv_lens=query + 7, page_table=torch.zeros(rows, 1, dtype=torch.int32),
                         slot_mapping=torch.zeros(tokens, dtype=torch.int64), page_size=16,
                         state_slots=torch.arange(rows))
    with torch.no_grad(), AllocationTrace() as trace:
        TorchLinearAttention().paged(mixed, layer.conv1d.weight, decay, beta, dims, meta=meta, state=state)
    planned = sizing.linear_core_peak_bytes(shape, tokens, 2, rows, paged=True)
    slack = 1.5 if rows < 16 else 2.0  # 64 rows of 8 tokens: the padded-token bound counts a whole chunk per row
    assert trace.peak() <= planned <= slack * trace.peak(), f"{family}: {trace.peak():,} vs {planned:,}"


def test_the_rollout_workspace_plans_a_prefill_of_every_running_sequence():
    """If this fails, the plan sizes a CPU rollout's prefill for fewer rows than may share it (the scan group's
    bound instead of every running sequence): many short rows (chunked tails, re-prefills after preemption) then
    hold more delta-rule states than planned (the test above measures that peak for 64 rows of 8 tokens)."""
    from opdgraph.compile import compile_plan
    from opdgraph.config.loader import load_pipeline

    cfg = load_pipeline(str(pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "qwen35_0b8_from_4b.toml"), ["pipeline.device=cpu"])
    plan, rollout = compile_plan(cfg), cfg.stages["rollout"].config
    shape = cfg.shapes[cfg.model_with_role("student")]
    rows = min(plan.facts["rollout.concurrent_seqs"], rollout.prefill_token_budget)
    needed = sizing.linear_core_peak_bytes(shape, rollout.prefill_token_budget, 2, rows, paged=True)
    assert plan.buffers["rollout.workspace"].bytes >= needed


def test_linear_chunk_mirrors_the_delta_rule():
    """If this fails, the plan's chunk size of the delta-rule scan drifted from the model's."""
    from opdgraph.models import delta_rule

    assert sizing.LINEAR_CHUNK_TOKENS == delta_rule.CHUNK_TOKENS
    assert sizing.LINEAR_GROUP_SEQUENCES == delta_rule.GROUP_SEQUENCES


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
                         models={"student": student, "teachers": _teachers(teacher),
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
