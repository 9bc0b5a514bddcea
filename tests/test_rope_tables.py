"""The RoPE tables a forward builds (models/decoder.py _rope_tables) against the plan's count (sizing.rope_table_kinds)
and attention windows (cuda_overheads.attention_windows, one flashinfer wrapper each)."""

import pytest
import torch

from opdgraph import sizing
from opdgraph.cuda_overheads import attention_windows
from opdgraph.model_shapes import shape_from_hf_config
from opdgraph.models import load_decoder
from opdgraph.models.tiny_configs import tiny_config


def _qwen2_sliding():
    config = tiny_config("qwen2")
    config.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    return config


def _gemma3_one_rope():
    config = tiny_config("gemma3")
    config.update(rope_local_base_freq=100000.0)  # the sliding layers' RoPE: the global one (no scaling)
    del config["rope_scaling"]
    return config


# (config, distinct tables the decoder builds, the plan's count, distinct attention windows)
CASES = {"qwen2": (tiny_config("qwen2"), 1, 1, 1), "qwen2 sliding": (_qwen2_sliding(), 1, 1, 2),
         "llama": (tiny_config("llama"), 1, 1, 1), "gemma3": (tiny_config("gemma3"), 2, 2, 2),
         "gemma3 one rope": (_gemma3_one_rope(), 1, 2, 2), "qwen3.5": (tiny_config("qwen3_5"), 1, 1, 1)}


@pytest.mark.parametrize("name", list(CASES))
def test_the_forward_builds_one_table_per_distinct_rope(name):
    """If this fails, a forward builds a RoPE table twice (the same rotation for full and sliding layers) or more
    tables than the plan's forward workspaces and activations hold, or the plan counts another number of attention
    windows than the layers have."""
    config, distinct, planned, windows = CASES[name]
    model = load_decoder(config, dtype=torch.float32, device="cpu")
    tables = model._rope_tables(torch.arange(5))
    assert len({id(pair) for pair in tables.values()}) == distinct
    attention = {layer.layer_type for layer in model.layers if layer.layer_type != "linear_attention"}
    assert set(tables) == attention  # every attention kind has its table, nothing else is built
    shape = shape_from_hf_config(config)
    assert sizing.rope_table_kinds(shape) == planned >= distinct
    assert attention_windows(shape) == windows == len(attention)
    if name == "qwen2 sliding":
        assert tables["sliding_attention"] is tables["full_attention"]
