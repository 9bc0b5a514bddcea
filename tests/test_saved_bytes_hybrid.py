"""The memory plan's bytes for the hybrid (Qwen3.5) models against what the runtime really keeps: saved activations,
the no-grad forward's peak in a linear-attention layer's core, the backward's recompute of that core, the rollout's
decode and prefill steps. Method and standard as tests/test_saved_bytes.py says."""

from __future__ import annotations

import contextlib
import functools
import pathlib

import pytest
import torch
from torch.profiler import record_function

from memory_probe import AllocationTrace, flash_backend
from opdgraph import sizing
from opdgraph.kernels import varlen_attention
from opdgraph.models.layer_kernels import TORCH
from opdgraph.model_shapes import shape_from_hf_config
from opdgraph.models.loading import build_random
from opdgraph.runtime import training
from saved_bytes_setup import (HYBRID, PATHS, SEQUENCE_LENGTHS, assert_close, family_config, family_model,
                               runtime_context, saved_by_the_training_forward)


@pytest.mark.parametrize("flash_path, kernels", PATHS)
@pytest.mark.parametrize("family", list(HYBRID))
def test_hybrid_saved_activations_match_the_plan(family, flash_path, kernels, monkeypatch):
    """If this fails, a Qwen3.5 gated-DeltaNet layer (a_linear) or its gated, partially rotated attention layer saves
    another number of bytes per token than the plan assumes for each kind."""
    shape, measured, tokens = saved_by_the_training_forward(family, flash_path, kernels, monkeypatch)
    repeated = flash_path == "repeat_kv"
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


BACKWARD = "memory_probe.backward"  # the event around training.backward in a net trace


def backward_trace(model, lengths: tuple[int, ...], checkpointing: bool = False, net: bool = False):
    """(the AllocationTrace of training.backward, tokens) after a training forward over `lengths`, with the
    runtime's fp32 gradient sums (each bf16 gradient folded into an accumulator allocated beforehand and dropped at
    once: runtime/gradients.py). net: the trace begins before the forward, so the activations the backward frees
    count (peaks since=BACKWARD: what the plan's backward workspace adds to the whole micro-batch's activations);
    else it holds the backward's own allocations only."""
    from opdgraph.runtime.gradients import StudentGradients

    model.set_attention_backend(varlen_attention.select_packed_backend("cpu"))
    model.set_layer_kernels(TORCH)
    inputs, loop, tokens = runtime_context(model, checkpointing=checkpointing, lengths=lengths)
    gradients = StudentGradients(model, inputs.values, "student.grads", fp32=True)
    gradients.accumulators()
    try:
        with contextlib.ExitStack() as stack:
            trace = stack.enter_context(AllocationTrace()) if net else None
            training.student_forward(inputs, keep_graph=True, write_hidden=True)
            hidden = inputs.values.get_item(loop.local("student_hidden"), 0)
            inputs.values.put_item(loop.local("hidden_grad"), 0, torch.randn_like(hidden))  # what the loss hands on
            del hidden
            trace = trace or stack.enter_context(AllocationTrace())
            with record_function(BACKWARD):
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
    backward workspace (net of the activations freed by then) at the bound on padded tokens, or
    linear_recompute_peak_bytes at the padded tokens these sequences really have misses a tensor of the recompute
    (under its own allocations' peak) or counts one that is not there (20% over it)."""
    model, shape = linear_layer_model(family)
    # While the core's backward runs: on CPU the fold of the largest weight's gradient copies it to fp32 first, a
    # transient of the gradients (above this peak at 4B's widths), not of the layer's backward.
    net, tokens = backward_trace(model, lengths, net=True)
    measured = net.peak(within="RecomputedCoreBackward", since=BACKWARD)
    planned = sizing.backward_workspace_bytes(shape, tokens, 2, len(lengths), max(lengths),
                                              reference_sequence_tokens=max(lengths))
    assert measured <= planned, f"{family} {lengths}: {measured:,} vs {planned:,}"
    if family != "qwen3.5-0.8b":  # the formula's terms at one width (each trace of 4B's takes a minute on CPU)
        return
    own, _ = backward_trace(model, lengths)
    allocated = own.peak(within="RecomputedCoreBackward")
    exact = sizing.linear_recompute_peak_bytes(shape, tokens, 2, len(lengths), padded_tokens=padded_tokens(lengths))
    assert allocated <= exact <= 1.2 * allocated, f"{family} {lengths}: {allocated:,} vs {exact:,}"


def test_a_backward_in_pieces_peaks_lower_and_within_the_workspace(monkeypatch):
    """If this fails, recomputing the core in pieces of whole sequences (PiecewiseRecompute; a budget of 128 padded
    tokens here, so that these lengths make four pieces) does not lower the backward's peak, or peaks above the
    plan's workspace for pieces (linear_recompute_workspace_bytes)."""
    from opdgraph.models import linear_attention_backend

    lengths = (96, 32, 64, 5, 70)
    model, shape = linear_layer_model("qwen3.5-0.8b")
    whole, tokens = backward_trace(model, lengths, net=True)
    for module, name in ((linear_attention_backend, "RECOMPUTE_PADDED_TOKENS"),
                         (sizing, "LINEAR_RECOMPUTE_PADDED_TOKENS")):
        monkeypatch.setattr(module, name, 128)
    pieces, _ = backward_trace(model, lengths, net=True)
    measured = pieces.peak(within="RecomputedCoreBackward", since=BACKWARD)
    recompute = sizing.linear_recompute_workspace_bytes(shape, tokens, 2, len(lengths), max(lengths))
    freed = sizing.freed_before_last_linear_core_bytes(shape, tokens, 2, False)
    assert measured <= recompute - freed, f"{measured:,} vs {recompute:,} - {freed:,}"
    assert measured < 0.6 * whole.peak(within="RecomputedCoreBackward", since=BACKWARD)


def test_checkpointed_hybrid_backward_peak_is_covered():
    """If this fails, a checkpointed linear-attention layer's backward (its forward recomputed, its core's no-grad
    peak inside that, then the core recomputed again with autograd) peaks above the backward workspace plus the one
    recomputed layer the checkpointed activations hold."""
    lengths = (128, 96, 32)
    model, shape = linear_layer_model("qwen3.5-0.8b")
    trace, tokens = backward_trace(model, lengths, checkpointing=True, net=True)
    recomputed = tokens * sizing.activation_bytes_per_token_per_layer(shape, 2, reference_sequence_tokens=max(lengths))
    planned = sizing.backward_workspace_bytes(shape, tokens, 2, len(lengths), max(lengths),
                                              reference_sequence_tokens=max(lengths), checkpointing=True)
    measured = trace.peak(since=BACKWARD)
    assert measured <= planned + recomputed, f"{measured:,} vs {planned:,} + {recomputed:,}"


def test_the_backward_workspace_plans_the_recompute_over_every_sequence_of_the_step():
    """If this fails, the plan sizes a hybrid student's backward without its linear layers' recomputing core, or for
    fewer sequences than a micro-batch may pack (short responses: many more than sequences_per_micro_batch, each
    padded to whole chunks in the recompute's graph; the tests above measure that peak), or for a checkpointed
    student holds what a plain one frees."""
    from opdgraph.compile import compile_plan
    from opdgraph.config.loader import load_pipeline

    path = str(pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "qwen35_0b8_from_4b.toml")
    for checkpointing in (False, True):
        cfg = load_pipeline(path, overrides=[f"backward.activation_checkpointing={str(checkpointing).lower()}"])
        plan, shape = compile_plan(cfg), cfg.shapes[cfg.model_with_role("student")]
        tokens, sequences = plan.facts["train.micro_batch_tokens"], plan.facts["rollout.sequences"]
        recompute = sizing.linear_recompute_workspace_bytes(shape, tokens, 2, sequences,
                                                            plan.facts["train.sequence_tokens"])
        freed = sizing.freed_before_last_linear_core_bytes(shape, tokens, 2, checkpointing)
        per_layer = tokens * sizing.activation_bytes_per_token_per_layer(shape, 2)
        assert plan.buffers["backward.workspace"].bytes == max(per_layer, recompute - freed), checkpointing
        if checkpointing:  # only the checkpoints of the later layers are freed: the recompute is what is held
            assert recompute - freed > per_layer


def test_the_activations_freed_before_the_last_linear_core_are_the_planned(monkeypatch):
    """If this fails, the backward has freed other saved tensors than freed_before_last_linear_core_bytes says when
    the last linear-attention layer's core recomputes (the plan takes them off its workspace): the final norm's, the
    later attention layer's, and that layer's own after its core. Read through saved_tensors_hooks: each saved
    tensor is packed in a box whose finaliser marks it freed. (A checkpointed layer saves through hooks of its own,
    which these cannot see: test_checkpointed_hybrid_backward_peak_is_covered measures that case's net peak.)"""
    import weakref

    from opdgraph.models import linear_attention_backend

    lengths = (64,)  # one sequence: the CPU reference attention's saved scores are exactly T x S
    model = family_model("qwen3.5-0.8b")
    shape = shape_from_hf_config(family_config("qwen3.5-0.8b"))
    model.set_attention_backend(varlen_attention.select_packed_backend("cpu"))
    model.set_layer_kernels(TORCH)
    inputs, loop, tokens = runtime_context(model, lengths=lengths)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: list[tuple[int, int]] = []  # (storage, bytes) per packed tensor
    freed: set[int] = set()
    at_core: dict[str, set[int]] = {}

    class Box:
        def __init__(self, tensor):
            self.tensor = tensor

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in parameters or not storage.nbytes():
            return tensor
        box = Box(tensor)
        weakref.finalize(box, freed.add, len(saved))
        saved.append((storage.data_ptr(), storage.nbytes()))
        return box

    backward = linear_attention_backend.RecomputedCore.backward

    def noting_backward(ctx, grad_out):
        at_core.setdefault("freed", set(freed))
        return backward(ctx, grad_out)

    monkeypatch.setattr(linear_attention_backend.RecomputedCore, "backward", staticmethod(noting_backward))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor if isinstance(box, Box) else box):
        training.student_forward(inputs, keep_graph=True, write_hidden=True)
    hidden = inputs.values.get_item(loop.local("student_hidden"), 0)
    inputs.values.put_item(loop.local("hidden_grad"), 0, torch.randn_like(hidden))
    del hidden
    training.backward(inputs)
    model.zero_grad(set_to_none=True)
    alive = {pointer for index, (pointer, _) in enumerate(saved) if index not in at_core["freed"]}
    gone = {pointer: size for index, (pointer, size) in enumerate(saved)
            if index in at_core["freed"] and pointer not in alive}
    planned = sizing.freed_before_last_linear_core_bytes(shape, tokens, 2, False,
                                                         reference_sequence_tokens=max(lengths))
    assert_close(sum(gone.values()), planned, "freed before the last linear layer's core")


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

    pipeline = pathlib.Path(__file__).resolve().parents[1] / "pipelines" / "qwen35_0b8_from_4b.toml"
    cfg = load_pipeline(str(pipeline), ["pipeline.device=cpu"])
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
