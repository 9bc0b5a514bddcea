"""What the saved-bytes tests share (tests/test_saved_bytes*.py): the families at their real widths (2 layers, a
small vocabulary, bf16), one shared model per family, the runtime's StageInputs over one packed micro-batch, the
layer-kernel switch, and the 2% comparison. See tests/test_saved_bytes.py for what these tests check and why."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import opdgraph  # noqa: E402
from memory_probe import FLASH_PATHS, flash_backend, saved_bytes  # noqa: E402
from triton_interpreter import interpret_liger  # noqa: E402
from opdgraph.kernels.liger_layers import liger_import_error  # noqa: E402
from opdgraph.models.layer_kernels import TORCH  # noqa: E402
from opdgraph.models.attention_metadata import PackedMetadata  # noqa: E402
from opdgraph.models.loading import build_random  # noqa: E402
from opdgraph.runtime.batches import MicroBatch  # noqa: E402
from opdgraph.runtime.buffers import BufferTable  # noqa: E402
from opdgraph.runtime.stage_inputs import LoopState, StageInputs  # noqa: E402

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



def one_teacher_stage(model) -> dict:
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
                         models={"student": model, "teacher": one_teacher_stage(model)["teacher_score"]},
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


def saved_by_the_training_forward(family: str, flash_path: str, kernels: str, monkeypatch):
    """(shape, bytes saved per region, tokens) of the loss's student forward (runtime/training.py) of the family's
    shared model over one micro-batch, on that attention path with those layer kernels (tests/memory_probe.py
    saved_bytes: layer0, layer1, outside, and the output student_activations holds)."""
    from opdgraph.model_shapes import shape_from_hf_config
    from opdgraph.runtime import training

    model = family_model(family)
    model.set_attention_backend(flash_backend(monkeypatch, flash_path))
    use_layer_kernels(model, kernels, monkeypatch)
    inputs, loop, tokens = runtime_context(model)

    def forward():
        training.student_forward(inputs, keep_graph=True, write_hidden=True)
        return inputs.values.get_item("student_activations", 0)

    measured = saved_bytes(model, forward, inputs=(loop.micro_batch.input_ids,))
    return shape_from_hf_config(family_config(family)), measured, tokens
