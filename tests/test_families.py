"""The family table (opdgraph/families.py) against the installed transformers: keys, defaults and structure.

The table is written by hand (the planner may not import transformers), so these tests are what keeps it true: every
key the installed transformers' config class of a family defines must be in the table (read or listed as ignored),
the defaults the planner applies must be the ones transformers applies, and the structural rules (biases, q/k norm,
sandwich norms, (1 + w) norms, embedding scale, RoPE per layer type) must match the modules transformers builds.
The device machines run another transformers 5.x than this one; the key lists hold the keys of both (5.17 and 5.24
define the same ones), and a key only a newer version adds makes the first test fail with the key named.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

from opdgraph.families import FAMILIES, REJECTED_MODEL_TYPES, DERIVED

MODEL_TYPES = sorted(FAMILIES)
INVALID = (TypeError, ValueError, StrictDataclassError)  # how transformers 5 rejects a config
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4}


def hf_config(model_type: str, **keys) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(model_type=model_type, **{**SMALL, **keys})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_key_transformers_defines_is_in_the_table(model_type):
    """If this fails, the installed transformers defines a config key the table does not know: the planner would
    call a real config's key unknown (or, worse, a typo of it valid). Add it to families.py, read or ignored."""
    config_class = type(transformers.AutoConfig.for_model(model_type))
    defined = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    missing = sorted(defined - FAMILIES[model_type].keys)
    assert not missing, f"transformers {transformers.__version__} {config_class.__name__} defines {missing}"


# Attributes the modeling files read that are no keys of a text decoder's config: private settings, and the
# multimodal Gemma 3 parts that share modeling_gemma3.py with the text model.
NOT_CONFIG_KEYS = {"_attn_implementation", "get_text_config", "text_config", "vision_config", "image_token_id",
                   "mm_tokens_per_image", "video_token_id"}


def vision_keys(model_type: str) -> set[str]:
    """The keys of the vision config of a multimodal checkpoint whose modeling file the text model shares (Qwen3.5:
    its vision tower is never built)."""
    if model_type != "qwen3_5_text":
        return set()
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig

    return set(Qwen3_5VisionConfig().to_dict()) | set(Qwen3_5VisionConfig.attribute_map)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_key_the_modeling_code_reads_is_in_the_table(model_type):
    """If this fails, transformers' model of the family reads a config key (as Qwen2's attention reads head_dim,
    which Qwen2Config does not define) that the table would reject or does not know."""
    import inspect
    import re

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type))
    source = inspect.getsource(sys.modules[type(model).__module__])
    read = set(re.findall(r"\bconfig\.([A-Za-z_]\w*)", source))
    read |= set(re.findall(r"getattr\((?:self\.)?config, \"(\w+)\"", source))
    missing = sorted(read - NOT_CONFIG_KEYS - vision_keys(model_type) - FAMILIES[model_type].keys)
    assert not missing, f"transformers {transformers.__version__} {type(model).__name__} reads {missing}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_planner_defaults_are_the_ones_transformers_applies(model_type):
    """If this fails, a config without head_dim, num_key_value_heads, tie_word_embeddings, ... gets another shape
    in `plan` than in `run` (which reads the config through transformers)."""
    family = FAMILIES[model_type]
    normalised = hf_config(model_type).to_dict()
    for key, default in family.defaults.items():
        expected = normalised.get(key)
        if key == "head_dim" and expected is None:  # no head_dim attribute: the model derives it
            expected = SMALL["hidden_size"] // SMALL["num_attention_heads"]
        if key == "partial_rotary_factor":  # transformers moves it into rope_parameters
            expected = normalised["rope_parameters"]["partial_rotary_factor"]
        if key == "full_attention_interval":  # transformers turns it into layer_types and drops it
            assert family.layer_types({**SMALL, "num_hidden_layers": 9}) == tuple(
                hf_config(model_type, num_hidden_layers=9).to_dict()["layer_types"])
            continue
        got = family.default(key, dict(SMALL))
        assert got == expected, f"{model_type} default of {key}: table {got!r} ({default!r}), transformers {expected!r}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("key", ["head_dim", "num_key_value_heads"])
def test_null_sizes_accepted_exactly_where_transformers_accepts_them(model_type, key):
    """If this fails, `plan` accepts a null head_dim / num_key_value_heads that transformers rejects at run time
    (or rejects one that it reads as 'derive it')."""
    family = FAMILIES[model_type]
    if key not in transformers.AutoConfig.for_model(model_type).to_dict():
        return  # not a field of the config class (Qwen2's head_dim, read by its modules only): null is not derived
    try:
        normalised = hf_config(model_type, **{key: None}).to_dict()
    except INVALID:
        accepted = False
    else:
        accepted = True
        derived = {"head_dim": SMALL["hidden_size"] // SMALL["num_attention_heads"],
                   "num_key_value_heads": SMALL["num_attention_heads"]}[key]
        assert normalised[key] == derived
    assert (key in family.nullable) == accepted


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hidden_size_divisibility_rule_matches_transformers(model_type):
    """If this fails, a hidden size that is not a multiple of the heads (with head_dim given) passes `plan` and
    fails in transformers at run time, or the other way round."""
    family = FAMILIES[model_type]
    if "head_dim" not in family.keys:
        return  # head_dim is always hidden_size // heads there, so divisibility is required anyway
    try:
        hf_config(model_type, hidden_size=30, head_dim=8, num_key_value_heads=2)
    except INVALID:
        rejected = True
    else:
        rejected = False
    assert family.hidden_divisible_by_heads == rejected


def structure(model_type: str, **keys) -> dict:
    """What transformers really builds for a config: biases, norms, embedding scale, RoPE layout."""
    depth = {"num_hidden_layers": 4} if model_type == "qwen3_5_text" else {}  # Qwen3.5's 4th layer is full attention
    config = hf_config(model_type, num_key_value_heads=2, **depth, **keys)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    layer = next(layer for layer in model.model.layers if hasattr(layer, "self_attn"))  # Qwen3.5: layer 3
    attention, mlp = layer.self_attn, layer.mlp
    norm = type(layer.input_layernorm)(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.zero_()
        zero_weight_output = norm(torch.ones(1, 8))
    return {
        "architecture": type(model).__name__,
        "qkv_bias": attention.q_proj.bias is not None,
        "o_bias": attention.o_proj.bias is not None,
        "mlp_bias": mlp.gate_proj.bias is not None,
        "qk_norm": hasattr(attention, "q_norm"),
        "sandwich_norms": hasattr(layer, "pre_feedforward_layernorm"),
        "one_plus_norm": bool(zero_weight_output.abs().sum() > 0),  # (1 + 0) * x is x; 0 * x is 0
        "embedding_scale": hasattr(model.model.embed_tokens, "embed_scale"),
        "rope_per_layer_type": set(config.rope_parameters) <= {"full_attention", "sliding_attention"},
        "linear_attention": any(hasattr(layer, "linear_attn") for layer in model.model.layers),
        # The gated attention's q_proj yields q and a gate of the same width.
        "attention_output_gate": attention.q_proj.out_features == 2 * attention.o_proj.in_features,
    }


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("switched_on", [False, True])
def test_structural_rules_match_the_transformers_modules(model_type, switched_on):
    """If this fails, the planner or the runtime builds a layer with a bias, norm or scale transformers' model of
    that family does not have (or misses one it has): parameter counts and logits differ."""
    family = FAMILIES[model_type]
    keys = {key: switched_on for key in ("attention_bias", "mlp_bias") if key in family.keys}
    built = structure(model_type, **keys)
    expected = {"architecture": family.architecture, "qkv_bias": family.flag(family.qkv_bias, keys),
                "o_bias": family.flag(family.o_bias, keys), "mlp_bias": family.flag(family.mlp_bias, keys),
                "qk_norm": family.qk_norm, "sandwich_norms": family.sandwich_norms,
                "one_plus_norm": family.one_plus_norm, "embedding_scale": family.embedding_scale,
                "rope_per_layer_type": family.rope_per_layer_type, "linear_attention": family.linear_attention,
                "attention_output_gate": family.attention_output_gate}
    assert built == expected


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("switched_on", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_planner_parameter_count_is_transformers_count(model_type, switched_on, tied):
    """If this fails, `plan` sizes a model with other parameters than the one transformers (and the runtime) builds
    from the same config, e.g. the attention output bias of Qwen3 / Gemma 3 with attention_bias = true."""
    from opdgraph.model_shapes import shape_from_hf_config

    family = FAMILIES[model_type]
    keys = {key: switched_on for key in ("attention_bias", "mlp_bias") if key in family.keys}
    config = {**SMALL, "model_type": model_type, "num_key_value_heads": 2, "tie_word_embeddings": tied, **keys}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    assert shape_from_hf_config(config).parameter_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sliding_window_rule_and_activation_key_match(model_type):
    """If this fails, the table's way of choosing sliding layers or naming the activation is not the family's."""
    family = FAMILIES[model_type]
    normalised = hf_config(model_type).to_dict()
    assert family.activation_key in normalised
    kind = ("pattern" if "_sliding_window_pattern" in normalised else "max_window_layers"
            if "max_window_layers" in normalised else "none")
    assert family.sliding_windows == kind
    assert ("layer_types" in family.keys) == (kind != "none" or family.linear_attention)


def test_rejected_model_types_are_not_families_and_defaults_are_known_keys():
    """If this fails, a model type is both supported and rejected, or a default names a key the family lacks."""
    assert not set(REJECTED_MODEL_TYPES) & set(FAMILIES)
    for family in FAMILIES.values():
        assert set(family.defaults) - {"head_dim"} <= family.keys, family.name
        assert all(value != DERIVED or key in ("head_dim", "num_key_value_heads")
                   for key, value in family.defaults.items())


BLOCKED = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import opdgraph.families, opdgraph.model_config_check, opdgraph.gguf_header, opdgraph.model_shapes
from opdgraph.config import load_pipeline
load_pipeline(sys.argv[1])
"""


def test_planner_side_needs_neither_torch_nor_transformers():
    """If this fails, the family table or the model config check imports torch or transformers at plan time."""
    import pathlib

    tiny = pathlib.Path(__file__).parent.parent / "pipelines" / "tiny.toml"
    result = subprocess.run([sys.executable, "-c", BLOCKED, str(tiny)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


LAYER_TYPE_CASES = [
    ("llama", {}), ("qwen2", {}), ("qwen2", {"use_sliding_window": True, "max_window_layers": 2}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": None, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "max_window_layers": 3}), ("qwen3", {"max_window_layers": 1}),
    ("gemma3_text", {}), ("gemma3_text", {"sliding_window_pattern": 3}),
    ("gemma3_text", {"layer_types": ["full_attention"] * 7}),
    ("qwen3_5_text", {}), ("qwen3_5_text", {"full_attention_interval": 2}),
]


@pytest.mark.parametrize("model_type, keys", LAYER_TYPE_CASES)
def test_layer_types_are_the_ones_transformers_derives(model_type, keys):
    """If this fails, the planner's layer kinds (families.Family.layer_types: which layers slide, which are linear)
    differ from the normalised config's layer_types the runtime's decoder is built from: the plan's attention
    windows (flashinfer wrappers) and RoPE tables would not be the run's."""
    config = {**SMALL, "num_hidden_layers": 7, "model_type": model_type, **keys}
    expected = transformers.AutoConfig.for_model(**config).to_dict().get("layer_types") or ["full_attention"] * 7
    assert FAMILIES[model_type].layer_types(config) == tuple(expected)
