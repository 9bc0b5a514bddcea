"""Qwen3.5 configs (model_type qwen3_5_text, and the text part of a multimodal qwen3_5 checkpoint) are read and checked
by the one family table, as strictly as the other families, at plan time and at run time alike.

A failure means a published Qwen3.5 config is refused, a typo in one is accepted, the planner and the runtime read a
multimodal checkpoint's text model differently, or the planner's shapes differ from the model transformers builds.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import transformers

import opdgraph
from opdgraph.model_config_check import config_problems, ignored_keys, text_part
from opdgraph.model_shapes import ShapeError, shape_from_hf_config, shape_from_path
from opdgraph.models import ModelLoadError
from opdgraph.models.config import decoder_config_from_hf
from opdgraph.models.tiny_configs import tiny_config

CONFIGS = pathlib.Path(opdgraph.__file__).parent / "model_configs"
SHIPPED = ("qwen3.5-0.8b-text.json", "qwen3.5-4b-text.json")


def wrapped(text: dict, **outer) -> dict:
    """A multimodal qwen3_5 checkpoint's config around `text` (a small vision config: it is never built)."""
    text = {key: value for key, value in text.items() if key != "architectures"}
    return {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": text,
            "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "out_hidden_size": text["hidden_size"]},
            "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
            "vision_end_token_id": 248054, **outer}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_count_the_parameters_transformers_builds(name):
    """If this fails, a shipped Qwen3.5 config is refused or the planner sizes another model than transformers'."""
    config = json.loads((CONFIGS / name).read_text())
    shape = shape_from_path(str(CONFIGS / name), ".")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    assert shape.parameter_count() == sum(parameter.numel() for parameter in model.parameters())
    assert shape.linear_layers == 3 * shape.layers // 4 and shape.attention_layers == shape.layers // 4
    assert shape.rotary_dim == 64 and shape.output_gate
    assert ignored_keys(config) == ["dtype", "eos_token_id", "mamba_ssm_dtype", "mtp_num_hidden_layers",
                                    "mtp_use_dedicated_embeddings", "use_cache"]


@pytest.mark.parametrize("tied", [None, False, True])
def test_multimodal_checkpoint_reads_as_its_text_model(tied):
    """If this fails, the text model of a qwen3_5 checkpoint gets another shape than the same config given as
    qwen3_5_text, or the outer tie_word_embeddings (the one transformers ties by) is not the one applied."""
    text = tiny_config("qwen3_5")
    outer = {} if tied is None else {"tie_word_embeddings": tied}
    config = wrapped(text, **outer)
    assert config_problems(config)[1] == []
    expected = {**text, **outer}
    assert shape_from_hf_config(config) == shape_from_hf_config(expected)
    decoder = decoder_config_from_hf(config)
    assert decoder.family == "qwen3_5" and decoder.tie_word_embeddings == bool(tied)
    assert decoder.hf["model_type"] == "qwen3_5_text" and "vision_config" not in decoder.hf
    assert text_part(config)["architectures"] == ["Qwen3_5ForCausalLM"]


def changed(**changes) -> dict:
    config = tiny_config("qwen3_5")
    config.update(changes)
    return config
BAD = {
    "typo in a linear key": (changed(linear_num_value_head=4),
                             "unknown key 'linear_num_value_head' for model_type 'qwen3_5_text'; did you mean "
                             "'linear_num_value_heads'?"),
    "sliding layer": (changed(layer_types=["linear_attention", "sliding_attention", "full_attention",
                                           "full_attention"]), "'layer_types' must be a list of 'linear_attention'"),
    "value heads not a multiple": (changed(linear_num_value_heads=3), "linear_num_value_heads (3) must be a multiple "
                                                                      "of linear_num_key_heads (2)"),
    "ungated attention": (changed(attn_output_gate=False), "'attn_output_gate' = False is not supported"),
    "moe layers": (changed(mlp_only_layers=[1]), "'mlp_only_layers' = [1] is not supported"),
    "zero conv kernel": (changed(linear_conv_kernel_dim=0), "'linear_conv_kernel_dim' must be a positive integer"),
    "rotary factor above 1": (changed(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 1.5}),
                              "'rope_parameters.partial_rotary_factor' must be a number in (0, 1]"),
    "odd rotated dims": (changed(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.1875}), "rotated dims must be even"),
    "mrope typo": (changed(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_sections": [1, 1, 2]}),
                   "did you mean 'mrope_section'?"),
    "layer_types length": (changed(layer_types=["linear_attention", "full_attention"]),
                           "'layer_types' needs one entry per layer"),
    "mrope on another family": ({**tiny_config("qwen3"), "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 1e4,
                                                                             "mrope_section": [4, 4, 4]}},
                                "unknown key 'rope_parameters.mrope_section'"),
    "multimodal: unknown outer key": (wrapped(tiny_config("qwen3_5"), image_token=3),
                                      "unknown key 'image_token' for model_type 'qwen3_5'; did you mean "
                                      "'image_token_id'?"),
    "multimodal: typo inside text_config": (wrapped(changed(hiden_size=64)), "unknown key 'hiden_size'"),
    "multimodal: no text_config": ({"model_type": "qwen3_5", "vision_config": {}},
                                   "a qwen3_5 config needs its text model's config as an object 'text_config'"),
    "multimodal: wrong architecture": (wrapped(tiny_config("qwen3_5"), architectures=["Qwen3_5ForCausalLM"]),
                                       "unsupported architecture 'Qwen3_5ForCausalLM' for model_type 'qwen3_5'"),
    "moe": ({**tiny_config("qwen3_5"), "model_type": "qwen3_5_moe"}, "Qwen3.5 MoE is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_fail_the_same_way_at_plan_and_run_time(case):
    """If this fails, a bad Qwen3.5 config passes (and trains something else than asked) or plan and run disagree."""
    config, fragment = BAD[case]
    with pytest.raises(ShapeError) as planned:
        shape_from_hf_config(config, "cfg.json")
    with pytest.raises(ModelLoadError) as loaded:
        decoder_config_from_hf(config, "cfg.json")
    assert fragment in str(planned.value)
    assert str(planned.value) == str(loaded.value)


def test_problems_inside_text_config_name_their_nested_key():
    """If this fails, a TOML inline config's problem inside text_config is placed on the wrong line."""
    _, problems = config_problems(wrapped(changed(hiden_size=64)))
    assert [key for key, _ in problems] == ["text_config.hiden_size"]


def test_layer_types_default_to_every_fourth_layer_full():
    """If this fails, a config without layer_types (full_attention_interval, or its default 4) gets other layer kinds
    in the plan than transformers builds."""
    for interval in (None, 2, 3):
        config = {key: value for key, value in tiny_config("qwen3_5").items() if key != "layer_types"}
        config["num_hidden_layers"] = 7
        if interval is not None:
            config["full_attention_interval"] = interval
        expected = transformers.AutoConfig.for_model(**config).layer_types
        assert list(shape_from_hf_config(config).layer_types) == expected
        assert list(decoder_config_from_hf(config).layer_types) == expected
