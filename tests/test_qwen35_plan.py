"""The plan of a Qwen3.5 pair: KV pages for the attention layers only, the recurrent-state pool, and the engine's
allocations agreeing with those sizes.

A failure means `opdgraph plan` of the shipped Qwen3.5 pipeline breaks, the plan holds KV pages for layers that keep
none (or no state pool for those that keep one), or the engine allocates another state pool than the plan holds.
"""

from __future__ import annotations

import pathlib

import torch

from opdgraph import sizing
from opdgraph.compile import compile_plan
from opdgraph.config import load_pipeline
from opdgraph.model_shapes import shape_from_hf_config
from opdgraph.models import load_decoder
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.rollout import Request, RolloutEngine, SamplingParams

PIPELINE = pathlib.Path(__file__).parent.parent / "pipelines" / "qwen35_0b8_from_4b.toml"


def test_shipped_pipeline_plans_pages_and_state_pool():
    """If this fails, the rollout pool of the shipped pair is sized as if every layer kept K/V pages, or without the
    conv windows and delta-rule states of its 18 linear-attention layers."""
    plan = compile_plan(load_pipeline(str(PIPELINE)))
    facts = plan.facts
    pages, page_size = facts["rollout.num_pages"], facts["rollout.page_size"]
    # Qwen3.5-0.8B: 6 attention layers of 2 K/V heads x 256; 18 linear layers, 16 value heads of 128 x 128, conv
    # channels 2 x 16 x 128 + 16 x 128 = 6144, kernel 4; bf16; 128 slots (rollout.max_num_seqs) and the scratch slot
    # of the GPU path's padding and idle rows.
    attention_pages = pages * page_size * 6 * 2 * 2 * 256 * 2
    state_pool = 129 * 18 * (3 * 6144 * 2 + 16 * 128 * 128 * 4)
    assert plan.buffers["rollout.kv_cache"].bytes == attention_pages + state_pool
    assert facts["models.student.linear_attention_layers"] == 18
    assert "rollout.flashinfer" in plan.buffers  # the hybrid student rolls out on the flashinfer path


def test_engine_allocates_what_the_plan_sizes():
    """If this fails, the engine's KV pages or state slots differ from sizing's kv_cache_bytes and
    recurrent_state_bytes for the same model and pool."""
    config = tiny_config("qwen3_5")
    shape = shape_from_hf_config(config)
    model = load_decoder(config, dtype=torch.bfloat16)
    engine = RolloutEngine(model, page_size=4, num_pages=10, max_num_seqs=3, prefill_token_budget=8, device="cpu")
    engine.generate([Request("a", [1, 2, 3], SamplingParams(max_new_tokens=2, greedy=True), n=2)])
    pages = sum(layer.nbytes for layer in engine.kv_cache if isinstance(layer, torch.Tensor))
    states = sum(layer.nbytes for layer in engine.kv_cache if not isinstance(layer, torch.Tensor))
    assert pages == sizing.kv_cache_bytes(shape, 10, 4, 2)
    assert states == sizing.recurrent_state_bytes(shape, 3, 2)


def test_pruned_student_keeps_its_layer_kinds_in_plan_and_run():
    """If this fails, init_from + keep_layers of a Qwen3.5 teacher plans another student (its layer kinds, so its
    parameters, KV pages and state pool) than prune_layers builds."""
    from opdgraph.models import prune_layers

    config = tiny_config("qwen3_5")
    keep = [1, 3]  # the full-attention layer and a linear one
    pruned = prune_layers(load_decoder(config, dtype=torch.float32), keep)
    shape = shape_from_hf_config(config).keep(keep)
    assert pruned.config.layer_types == shape.layer_types == ("full_attention", "linear_attention")
    assert shape.parameter_count() == sum(parameter.numel() for parameter in pruned.parameters())
    assert shape_from_hf_config(pruned.config.hf) == shape
